-- Rate limit (GCRA) + optional quota reservation + hit/miss count, atomically, in one round trip.
-- Mirrored operation for operation by MemoryLimiter (app/limits/memory.py, app/limits/gcra.py): keep them equal.
-- KEYS: 1 rate (TAT, microseconds), 2 daily window hash, 3 monthly window hash, 4 history base,
--       5 the reservation's marker (written only if one is made)  (one {tenant} slot),
--       6 (hit probe only) a cache entry: see ARGV 9
-- ARGV: 1 interval_us, 2 burst, 3 reserve (0/1), 4 daily limit (-1 = none), 5 monthly limit (-1 = none),
--       6 now override (tests; '' = Redis TIME), 7 record ('hits', 'misses', 'forced', 'collapsed' or '';
--       counted only if admitted; forced and collapsed are misses too), 8 marker TTL (ms),
--       9 hit probe ('1': read KEYS[6] first; absent -> {'absent'}, nothing admitted or counted; present ->
--       admitted as below and the entry and its PTTL appended to the reply). Only on one Redis (KEYS[6]
--       is in another slot), so MemoryLimiter has no mirror of it: in memory the cache is read directly.
-- The marker ("<day> <month>": the periods it counted in) is what settle.lua consumes: a reservation is
-- settled at most once, however often its settlement is sent.
-- Returns {allowed, reason, retry_us, remaining, tat_minus_now_us,
--          day_used, day_reset_in_us, day_len_s, month_used, month_reset_in_us, month_len_s, day, month
--          [, entry, entry_pttl_ms (hit probe)]}
local entry, entry_pttl
if ARGV[9] == '1' then
  entry = redis.call('GET', KEYS[6])
  if not entry then return {'absent'} end
  entry_pttl = redis.call('PTTL', KEYS[6])
end
local now = now_us(ARGV[6])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local reserve = ARGV[3] == '1'
local dlimit, mlimit = tonumber(ARGV[4]), tonumber(ARGV[5])
local day, day_reset, day_len, month, month_reset, month_len = windows(now)
local dused = window_used(KEYS[2], day, day_len * 2)
local mused = window_used(KEYS[3], month, month_len * 2)

local function reply(allowed, reason, retry, remaining, tat_in)
  return {allowed, reason, retry, remaining, tat_in,
          dused, day_reset - now, day_len, mused, month_reset - now, month_len, day, month, entry, entry_pttl}
end

local capacity = interval * burst
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
local new_tat = math.floor(tat + interval)
if now < new_tat - capacity then
  return reply(0, 'rate_limited', math.ceil(new_tat - capacity - now), 0, tat - now)
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
local remaining = math.floor((now + capacity - new_tat) / interval + 1e-9)

if reserve then
  local retry = -1
  if dlimit >= 0 and dused >= dlimit then retry = day_reset - now end
  if mlimit >= 0 and mused >= mlimit and month_reset - now > retry then retry = month_reset - now end
  if retry >= 0 then
    return reply(0, 'quota_exceeded', retry, remaining, new_tat - now)
  end
  dused = redis.call('HINCRBY', KEYS[2], 'used', 1)
  mused = redis.call('HINCRBY', KEYS[3], 'used', 1)
  redis.call('SET', KEYS[5], day .. ' ' .. month, 'PX', ARGV[8])
end
if ARGV[7] ~= '' then
  local window_field = ARGV[7] == 'hits' and 'hits' or 'misses'
  redis.call('HINCRBY', KEYS[2], window_field, 1)
  redis.call('HINCRBY', KEYS[3], window_field, 1)
  history_add(KEYS[4], day, window_field, 1)
  if window_field ~= ARGV[7] then history_add(KEYS[4], day, ARGV[7], 1) end
end
return reply(1, '', 0, remaining, new_tat - now)
