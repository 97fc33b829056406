-- A replica's heartbeat: renew the leases of its waiters and slots, dispatch, and say which of
-- its waiters got a slot (or were lost: expired while it was not looking).
-- ARGV after the common head: 7 number of waiting tickets n, 8..7+n waiting tickets, then held tickets
-- Returns {hint_us, depth, n_mine, mine ticket/key/start-in-µs triples..., lost tickets...}
local n = tonumber(ARGV[7])
local waiting, held = {}, {}
for i = 8, 7 + n do waiting[#waiting + 1] = ARGV[i] end
for i = 8 + n, #ARGV do held[#held + 1] = ARGV[i] end
local lease_end = NOW + CFG.lease
for _, ticket in ipairs(waiting) do
  local info = redis.call('HGET', WINFO, ticket)
  if info then
    redis.call('ZADD', WLEASE, 'XX', math.min(parse_waiter(info).deadline, lease_end), ticket)
  else
    redis.call('ZADD', SLOTS, 'XX', lease_end, ticket)
  end
end
for _, ticket in ipairs(held) do redis.call('ZADD', SLOTS, 'XX', lease_end, ticket) end
expire()
local st = load()
dispatch(st)
local mine, lost = {}, {}
if #waiting > 0 then
  local values = redis.call('HMGET', GRANTED, unpack(waiting))
  for i, ticket in ipairs(waiting) do
    if values[i] then
      local name, start = string.match(values[i], '^([^|]*)|(.*)$')
      mine[#mine + 1] = ticket
      mine[#mine + 1] = name
      mine[#mine + 1] = math.max(0, tonumber(start) - NOW)
    elseif not redis.call('ZSCORE', WAIT, ticket) then
      lost[#lost + 1] = ticket
    end
  end
end
finish(false)
local out = {hint(st), redis.call('ZCARD', WAIT), #mine / 3}
for _, item in ipairs(mine) do out[#out + 1] = item end
for _, item in ipairs(lost) do out[#out + 1] = item end
return out
