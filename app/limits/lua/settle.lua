-- Commit (spent) or refund one reservation, in the periods it was made in, and add it to the
-- usage history of the day it was admitted on (also when that day is over). Once: the reservation's
-- marker (written by admit.lua) is consumed; without it (settled already, or never made) nothing
-- changes, so a settlement whose answer was lost can be sent again.
-- KEYS: 1 daily window hash, 2 monthly window hash, 3 history base, 4 the reservation's marker
-- ARGV: 1 'spent' | 'refund', 2 upstream attempts made, 3 '1' = answered by another replica's call (collapsed)
-- Returns 1 if settled now, 0 if there was nothing to settle.
local marker = redis.call('GET', KEYS[4])
if not marker then return 0 end
redis.call('DEL', KEYS[4])
local periods = {string.match(marker, '^(%d+) (%d+)$')}
for i = 1, 2 do
  if redis.call('HGET', KEYS[i], 'period') == periods[i] then
    if ARGV[1] == 'spent' then
      redis.call('HINCRBY', KEYS[i], 'spent', 1)
    elseif tonumber(redis.call('HGET', KEYS[i], 'used') or '0') > 0 then
      redis.call('HINCRBY', KEYS[i], 'used', -1)
    end
  end
end
if ARGV[1] == 'spent' then history_add(KEYS[3], periods[1], 'credits', 1) end
local attempts = tonumber(ARGV[2] or '0') or 0
if attempts > 0 then history_add(KEYS[3], periods[1], 'upstream_calls', attempts) end
if ARGV[3] == '1' then history_add(KEYS[3], periods[1], 'collapsed', 1) end
return 1
