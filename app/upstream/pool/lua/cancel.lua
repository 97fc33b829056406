-- A waiter gives up (its wait ran out, or its request went away).
-- ARGV after the common head: 7 ticket
-- Returns {'dropped'} | {'granted', key} (it got a slot meanwhile: use it or release it) | {'gone'}
local ticket = ARGV[7]
if redis.call('HGET', WINFO, ticket) then
  drop_waiter(ticket, true)
  return {'dropped', ''}
end
local name = redis.call('HGET', GRANTED, ticket)
if name then return {'granted', name} end
return {'gone', ''}
