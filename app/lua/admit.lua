-- Rate limit (GCRA) + optional quota reservation + hit/miss count, atomically, in one round trip.
-- KEYS: 1 rate (TAT, microseconds), 2 daily window hash, 3 monthly window hash  (one {tenant} slot)
-- ARGV: 1 interval_us, 2 burst, 3 reserve (0/1), 4 daily limit (-1 = none), 5 monthly limit (-1 = none),
--       6 now override (tests; '' = Redis TIME), 7 record ('hits', 'misses' or '')
-- Returns {allowed, reason, retry_us, remaining, tat_minus_now_us,
--          day_used, day_reset_in_us, day_len_s, month_used, month_reset_in_us, month_len_s, day, month}
local now = now_us(ARGV[6])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local reserve = ARGV[3] == '1'
local dlimit, mlimit = tonumber(ARGV[4]), tonumber(ARGV[5])
local day, day_reset, day_len, month, month_reset, month_len = windows(now)
local dused = window_used(KEYS[2], day, day_len * 2)
local mused = window_used(KEYS[3], month, month_len * 2)

local capacity = interval * burst
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
if now < new_tat - capacity then
  return {0, 'rate_limited', new_tat - capacity - now, 0, tat - now,
          dused, day_reset - now, day_len, mused, month_reset - now, month_len, day, month}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
local remaining = math.floor((now + capacity - new_tat) / interval)

if ARGV[7] ~= '' then
  redis.call('HINCRBY', KEYS[2], ARGV[7], 1)
  redis.call('HINCRBY', KEYS[3], ARGV[7], 1)
end
if reserve then
  local retry = -1
  if dlimit >= 0 and dused >= dlimit then retry = day_reset - now end
  if mlimit >= 0 and mused >= mlimit and month_reset - now > retry then retry = month_reset - now end
  if retry >= 0 then
    return {0, 'quota_exceeded', retry, remaining, new_tat - now,
            dused, day_reset - now, day_len, mused, month_reset - now, month_len, day, month}
  end
  dused = redis.call('HINCRBY', KEYS[2], 'used', 1)
  mused = redis.call('HINCRBY', KEYS[3], 'used', 1)
end
return {1, '', 0, remaining, new_tat - now,
        dused, day_reset - now, day_len, mused, month_reset - now, month_len, day, month}
