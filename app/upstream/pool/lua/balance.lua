-- A key's balance was read: a positive balance makes an exhausted key usable, none makes it exhausted.
-- ARGV after the common head: 7 key name, 8 balance ('' = the read failed)
-- Returns {hint_us, granted ticket/key/start-in-µs triples...}
local name, raw = ARGV[7], ARGV[8]
local state = redis.call('HGET', HEALTH, name .. ':state') or ''
if raw == '' then
  if state == 'exhausted' then redis.call('HSET', HEALTH, name .. ':recheck', int(NOW + CFG.recheck)) end
  return {0}
end
local balance = tonumber(raw)
redis.call('HSET', HEALTH, name .. ':bal', fmt(balance))
redis.call('HSET', HEALTH, name .. ':bal_at', int(NOW))
redis.call('HSET', HEALTH, name .. ':billed', '0')
if balance > 0 then
  if state == 'exhausted' then
    redis.call('HDEL', HEALTH, name .. ':state')
    redis.call('HDEL', HEALTH, name .. ':recheck')
  end
elseif state ~= 'disabled' then
  redis.call('HSET', HEALTH, name .. ':state', 'exhausted')
  redis.call('HSET', HEALTH, name .. ':recheck', int(NOW + CFG.recheck))
  redis.call('HSET', HEALTH, name .. ':why', 'BALANCE')
end
expire()
local st = load()
local granted = dispatch(st)
finish(true)
local out = {hint(st)}
for _, item in ipairs(granted) do out[#out + 1] = item end
return out
