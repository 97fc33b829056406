-- The operator view, read-only: per key {state, cool, recheck, bal, bal_at, billed, why, in flight}.
-- ARGV: the common head only. Returns {now, waiting, {rows...}, {tenant, n, tenant, n...}}
local counts = {}
local g = redis.call('HGETALL', GRANTED)
for i = 1, #g, 2 do
  local score = redis.call('ZSCORE', SLOTS, g[i])
  local name = string.match(g[i + 1], '^([^|]*)')
  if score and tonumber(score) > NOW then counts[name] = (counts[name] or 0) + 1 end
end
local rows = {}
for _, k in ipairs(CFG.keys) do
  local row = redis.call('HMGET', HEALTH, k.name .. ':state', k.name .. ':cool', k.name .. ':recheck', k.name .. ':bal',
                         k.name .. ':bal_at', k.name .. ':billed', k.name .. ':why')
  for i = 1, 7 do row[i] = row[i] or '' end
  row[8] = counts[k.name] or 0
  rows[#rows + 1] = row
end
local waiting = redis.call('ZCOUNT', WLEASE, '(' .. NOW, '+inf')
local by_tenant = {}
local f = redis.call('HGETALL', FLOWS)
for i = 1, #f, 2 do
  if string.sub(f[i], 1, 2) == 'n:' then
    by_tenant[#by_tenant + 1] = string.sub(f[i], 3)
    by_tenant[#by_tenant + 1] = f[i + 1]
  end
end
return {NOW, waiting, rows, by_tenant}
