-- A waiter gives up (its wait ran out, or its request went away).
-- ARGV after the common head: 7 ticket
-- Returns {'dropped', '', 0} | {'granted', key, start in µs} (it got a slot meanwhile: use it or release it)
--   | {'gone', '', 0}
local ticket = ARGV[7]
if redis.call('HGET', WINFO, ticket) then
  drop_waiter(ticket, true)
  return {'dropped', '', 0}
end
local value = redis.call('HGET', GRANTED, ticket)
if value then
  local name, start = string.match(value, '^([^|]*)|(.*)$')
  return {'granted', name, math.max(0, tonumber(start) - NOW)}
end
return {'gone', '', 0}
