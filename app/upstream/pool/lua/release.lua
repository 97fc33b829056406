-- A call gives its slot back with what it learned about the key, then waiters are dispatched.
-- ARGV after the common head: 7 ticket, 8 key name ('-' = nothing learned), 9 effect (ok|throttled|exhausted|disabled|-),
--   10 cooldown µs (0 = the default), 11 billed (0|1), 12 duration µs (0 = not measured), 13 ailabapi code
-- Returns {hint_us, depth, granted ticket/key/start-in-µs triples...}
local ticket, name, effect = ARGV[7], ARGV[8], ARGV[9]
local cool_us, billed, dur, code = tonumber(ARGV[10]), ARGV[11] == '1', tonumber(ARGV[12]), ARGV[13]
redis.call('ZREM', SLOTS, ticket)
redis.call('HDEL', GRANTED, ticket)
if name ~= '-' then
  if dur > 0 then
    local lat = tonumber(redis.call('HGET', FLOWS, 'lat') or CFG.lat0)
    redis.call('HSET', FLOWS, 'lat', fmt(lat * 0.8 + dur * 0.2))
  end
  if billed then redis.call('HINCRBY', HEALTH, name .. ':billed', 1) end
  local state = redis.call('HGET', HEALTH, name .. ':state') or ''
  if effect == 'throttled' then
    local until_us = NOW + CFG.cool
    if cool_us > 0 then until_us = NOW + cool_us end
    if until_us > tonumber(redis.call('HGET', HEALTH, name .. ':cool') or '0') then
      redis.call('HSET', HEALTH, name .. ':cool', int(until_us))
    end
    redis.call('HSET', HEALTH, name .. ':why', code)
  elseif effect == 'exhausted' then
    if state ~= 'disabled' then
      redis.call('HSET', HEALTH, name .. ':state', 'exhausted')
      redis.call('HSET', HEALTH, name .. ':recheck', int(NOW + CFG.recheck))
    end
    redis.call('HSET', HEALTH, name .. ':why', code)
  elseif effect == 'disabled' then
    redis.call('HSET', HEALTH, name .. ':state', 'disabled')
    redis.call('HSET', HEALTH, name .. ':why', code)
  elseif effect == 'ok' and not CFG.gated and state ~= '' then
    redis.call('HDEL', HEALTH, name .. ':state')
    redis.call('HDEL', HEALTH, name .. ':recheck')
  end
end
expire()
local st = load()
local granted = dispatch(st)
finish(false)
local out = {hint(st), redis.call('ZCARD', WAIT)}
for _, item in ipairs(granted) do out[#out + 1] = item end
return out
