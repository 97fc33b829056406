-- One call asks for a slot: granted at once, queued in fair order, or refused at once.
-- ARGV after the common head: 7 ticket, 8 tenant, 9 class (i|b), 10 own key ('-' = none), 11 fallback (0|1),
--   12 cost (1 / weight), 13 budget µs (how long it may wait)
-- Returns {status, value, hint_us, depth, granted ticket/key/start-in-µs triples...}: status 'granted' (value = key name),
--   'queued', or a refusal 'nokey' | 'tenant' | 'full' | 'late' (value = retry µs)
local ticket, tenant, cls, key = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local fallback, cost, budget = ARGV[11] == '1', tonumber(ARGV[12]), tonumber(ARGV[13])
expire()
local st = load()
local w = {tenant = tenant, cls = cls, key = key, fallback = fallback, s = '0', f = '0', deadline = NOW + budget,
           flow = 'f:' .. tenant .. '|' .. cls}
local cands = candidates(st, w)
local depth = redis.call('ZCARD', WAIT)
if #cands == 0 then return {'nokey', int(earliest_return(st, w)), 0, depth} end
local wait0 = 0
local all_cool = true
for _, k in ipairs(cands) do
  if health(st, k) ~= 'cool' then all_cool = false end
end
if all_cool then
  local m = nil
  for _, k in ipairs(cands) do
    if m == nil or st.cool[k.name] < m then m = st.cool[k.name] end
  end
  wait0 = m - NOW
  if wait0 > budget then return {'nokey', int(wait0), 0, depth} end
end
local r = rate(st, cands)
local n = tonumber(redis.call('HGET', FLOWS, 'n:' .. tenant) or '0')
if CFG.max_tenant > 0 and n >= CFG.max_tenant then return {'tenant', int(math.ceil(n / r)), 0, depth} end
if CFG.max_total > 0 and depth >= CFG.max_total then return {'full', int(math.ceil(depth / r)), 0, depth} end
local v = tonumber(redis.call('HGET', FLOWS, 'V') or '0')
local s = math.max(v, tonumber(redis.call('HGET', FLOWS, w.flow) or '0'))
local est = wait0 + redis.call('ZCOUNT', WAIT, '-inf', '(' .. fmt(s)) / r
if est > budget then
  local base = wait0 + redis.call('ZCOUNT', WAIT, '-inf', '(' .. fmt(v)) / r
  if n > 0 and depth > n and base <= budget then return {'tenant', int(math.ceil(est - budget)), 0, depth} end
  return {'late', int(math.ceil(est - budget)), 0, depth}
end
w.s, w.f = fmt(s), fmt(s + cost)
redis.call('ZADD', WAIT, w.s, ticket)
redis.call('HSET', WINFO, ticket, table.concat({tenant, cls, key, fallback and '1' or '0', w.s, w.f, int(w.deadline)}, '|'))
redis.call('ZADD', WLEASE, math.min(w.deadline, NOW + CFG.lease), ticket)
redis.call('HSET', FLOWS, w.flow, w.f)
redis.call('HINCRBY', FLOWS, 'n:' .. tenant, 1)
local granted = dispatch(st)
depth = redis.call('ZCARD', WAIT)
finish(true)
local status, value = 'queued', ''
for i = 1, #granted, 3 do
  if granted[i] == ticket then status, value = 'granted', granted[i + 1] end
end
local out = {status, value, hint(st), depth}
for _, item in ipairs(granted) do out[#out + 1] = item end
return out
