-- Shared by the quota scripts (prepended by app/limits/redis.py): UTC windows from Redis' clock,
-- so that replicas with skewed clocks still agree on "today" and "this month".
local function now_us(override)
  if override ~= nil and override ~= '' then return tonumber(override) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- days since 1970-01-01 -> year, month, day (H. Hinnant's civil_from_days)
local function civil(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end

-- year, month, day -> days since 1970-01-01 (days_from_civil)
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- {day_period, day_reset_us, day_len_s, month_period, month_reset_us, month_len_s}
local function windows(now)
  local days = math.floor(now / 86400000000)
  local y, m, d = civil(days)
  local ny, nm = y, m + 1
  if nm > 12 then ny, nm = y + 1, 1 end
  local month_start = days_from_civil(y, m, 1)
  local next_month = days_from_civil(ny, nm, 1)
  return string.format('%04d%02d%02d', y, m, d), (days + 1) * 86400000000, 86400,
         string.format('%04d%02d', y, m), next_month * 86400000000, (next_month - month_start) * 86400
end

-- The window hash holds one period's counters; a new period starts them from zero.
local function window_used(key, period, ttl_s)
  local current = redis.call('HGET', key, 'period')
  if current ~= period then
    redis.call('DEL', key)
    redis.call('HSET', key, 'period', period, 'used', 0, 'spent', 0, 'hits', 0, 'misses', 0)
  end
  redis.call('EXPIRE', key, ttl_s)
  return tonumber(redis.call('HGET', key, 'used'))
end

-- Usage history (chargeback): one hash per tenant and UTC day, '<base>:<YYYYMMDD>', and the
-- sorted set '<base>:days' of the days kept. The base is a declared key of the script and carries
-- the tenant's {hash tag}, so every key named after it is in the same Cluster slot. No TTL on
-- purpose: under volatile-lru only keys with a TTL are evicted, and finance data must not be.
-- Days older than HISTORY_KEEP_DAYS are deleted when a tenant's next new day starts.
local HISTORY_KEEP_DAYS = 410
local function history_add(base, day, field, n)
  local key = base .. ':' .. day
  local created = redis.call('EXISTS', key) == 0
  redis.call('HINCRBY', key, field, n)
  if created then
    local index = base .. ':days'
    local number = days_from_civil(tonumber(string.sub(day, 1, 4)), tonumber(string.sub(day, 5, 6)),
                                   tonumber(string.sub(day, 7, 8)))
    redis.call('ZADD', index, number, day)
    local cutoff = number - HISTORY_KEEP_DAYS
    for _, old in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', cutoff)) do
      redis.call('DEL', base .. ':' .. old)
    end
    redis.call('ZREMRANGEBYSCORE', index, '-inf', cutoff)
  end
end
