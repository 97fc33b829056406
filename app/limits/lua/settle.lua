-- Commit (spent) or refund one reservation, in the periods it was made in, and add it to the
-- usage history of the day it was admitted on (also when that day is over).
-- KEYS: 1 daily window hash, 2 monthly window hash, 3 history base
-- ARGV: 1 day period, 2 month period, 3 'spent' | 'refund', 4 upstream attempts made, 5 '1' = answered by
--       another replica's call (collapsed)
for i = 1, 2 do
  if redis.call('HGET', KEYS[i], 'period') == ARGV[i] then
    if ARGV[3] == 'spent' then
      redis.call('HINCRBY', KEYS[i], 'spent', 1)
    elseif tonumber(redis.call('HGET', KEYS[i], 'used') or '0') > 0 then
      redis.call('HINCRBY', KEYS[i], 'used', -1)
    end
  end
end
if ARGV[3] == 'spent' then history_add(KEYS[3], ARGV[1], 'credits', 1) end
local attempts = tonumber(ARGV[4] or '0') or 0
if attempts > 0 then history_add(KEYS[3], ARGV[1], 'upstream_calls', attempts) end
if ARGV[5] == '1' then history_add(KEYS[3], ARGV[1], 'collapsed', 1) end
return 1
