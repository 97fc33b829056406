-- The keys file changed: keys disabled because ailabapi refused them get another chance.
-- ARGV: the common head only. Returns {granted ticket/key/start-in-µs triples...}
for _, k in ipairs(CFG.keys) do
  if redis.call('HGET', HEALTH, k.name .. ':state') == 'disabled' then
    redis.call('HDEL', HEALTH, k.name .. ':state')
  end
end
expire()
local granted = dispatch(load())
finish(false)
return granted
