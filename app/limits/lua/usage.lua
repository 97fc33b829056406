-- Read a tenant's counters in the current windows, without changing anything.
-- KEYS: 1 rate, 2 daily, 3 monthly. ARGV: 1 now override ('' = Redis TIME)
-- Returns {stored_tat_us, day_reset_in_us, day_len_s, month_reset_in_us, month_len_s,
--          d_used, d_spent, d_hits, d_misses, m_used, m_spent, m_hits, m_misses, now_us}
local now = now_us(ARGV[1])
local day, day_reset, day_len, month, month_reset, month_len = windows(now)
local out = {}
out[1] = tonumber(redis.call('GET', KEYS[1]) or '0')
out[2], out[3], out[4], out[5] = day_reset - now, day_len, month_reset - now, month_len
local periods = {day, month}
for i = 1, 2 do
  local h = redis.call('HMGET', KEYS[i + 1], 'period', 'used', 'spent', 'hits', 'misses')
  for j = 2, 5 do
    local v = 0
    if h[1] == periods[i] then v = tonumber(h[j] or '0') end
    out[#out + 1] = v
  end
end
out[#out + 1] = now
return out
