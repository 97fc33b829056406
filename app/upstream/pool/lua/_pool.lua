-- The pool's decisions (prepended to every pool script by app/upstream/pool/redis.py).
-- Mirrored operation for operation by app/upstream/pool/core.py (Core over DictStore): keep them equal.
-- KEYS (one hash tag): 1 slots, 2 granted, 3 tat, 4 health, 5 wait, 6 winfo, 7 wlease, 8 flows
-- ARGV common head: 1 now override ('' = Redis TIME), 2 pool config, 3 keys config, 4 wake channel (same hash
-- tag), 5 replica, 6 'PUBLISH' or 'SPUBLISH' (on a Cluster a script may notify only a channel of its own slot)
local SLOTS, GRANTED, TAT, HEALTH, WAIT, WINFO, WLEASE, FLOWS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]

local function now_us(override)
  if override ~= nil and override ~= '' then return tonumber(override) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function split(s, sep)
  local out = {}
  for part in string.gmatch(s, '([^' .. sep .. ']+)') do out[#out + 1] = part end
  return out
end

local function fmt(x) return string.format('%.17g', x) end
local function int(x) return string.format('%d', x) end

local function config(pool_s, keys_s)
  local p = split(pool_s, ',')
  local cfg = {gated = p[1] == '1', pool_conc = tonumber(p[2]), pool_interval = tonumber(p[3]),
               lease = tonumber(p[4]), max_total = tonumber(p[5]), max_tenant = tonumber(p[6]),
               cool = tonumber(p[7]), recheck = tonumber(p[8]), scan = tonumber(p[9]), lat0 = tonumber(p[10]),
               horizon = tonumber(p[11]),
               keys = {}, by_name = {}}
  for _, item in ipairs(split(keys_s, '|')) do
    local f = split(item, ',')
    local k = {name = f[1], interval = tonumber(f[2]), conc = tonumber(f[3]), weight = tonumber(f[4]), tier = tonumber(f[5])}
    cfg.keys[#cfg.keys + 1] = k
    cfg.by_name[k.name] = k
  end
  return cfg
end

local CFG = config(ARGV[2], ARGV[3])
local NOW = now_us(ARGV[1])
local CHANNEL, REPLICA, PUBLISH = ARGV[4], ARGV[5], ARGV[6]
local WOKEN = {}

local function parse_waiter(info)
  local v = split(info, '|')
  return {tenant = v[1], cls = v[2], key = v[3], fallback = v[4] == '1', s = v[5], f = v[6], deadline = tonumber(v[7]),
          flow = 'f:' .. v[1] .. '|' .. v[2]}
end

local function drop_waiter(ticket, rollback)
  local info = redis.call('HGET', WINFO, ticket)
  redis.call('ZREM', WAIT, ticket)
  redis.call('ZREM', WLEASE, ticket)
  redis.call('HDEL', WINFO, ticket)
  if not info then return end
  local w = parse_waiter(info)
  local n = redis.call('HINCRBY', FLOWS, 'n:' .. w.tenant, -1)
  if n <= 0 then redis.call('HDEL', FLOWS, 'n:' .. w.tenant) end
  if rollback then
    if n <= 0 then
      redis.call('HDEL', FLOWS, w.flow)
    elseif redis.call('HGET', FLOWS, w.flow) == w.f then
      redis.call('HSET', FLOWS, w.flow, w.s)
    end
  end
end

local function expire()
  for _, ticket in ipairs(redis.call('ZRANGEBYSCORE', SLOTS, '-inf', NOW)) do
    redis.call('ZREM', SLOTS, ticket)
    redis.call('HDEL', GRANTED, ticket)
  end
  for _, ticket in ipairs(redis.call('ZRANGEBYSCORE', WLEASE, '-inf', NOW)) do
    drop_waiter(ticket, true)
  end
end

local function load()
  local st = {inflight = {}, total = 0, tat = {}, state = {}, cool = {}, recheck = {}}
  local g = redis.call('HGETALL', GRANTED)
  for i = 2, #g, 2 do
    local name = string.match(g[i], '^([^|]*)')
    st.inflight[name] = (st.inflight[name] or 0) + 1
    st.total = st.total + 1
  end
  local names, fields = {'*'}, {}
  for _, k in ipairs(CFG.keys) do
    names[#names + 1] = k.name
    fields[#fields + 1] = k.name .. ':state'
    fields[#fields + 1] = k.name .. ':cool'
    fields[#fields + 1] = k.name .. ':recheck'
  end
  local tats = redis.call('HMGET', TAT, unpack(names))
  local h = redis.call('HMGET', HEALTH, unpack(fields))
  st.pool_tat = tonumber(tats[1] or '0')
  for i, k in ipairs(CFG.keys) do
    st.tat[k.name] = tonumber(tats[i + 1] or '0')
    st.state[k.name] = h[3 * i - 2] or ''
    st.cool[k.name] = tonumber(h[3 * i - 1] or '0')
    st.recheck[k.name] = tonumber(h[3 * i] or '0')
  end
  return st
end

local function health(st, k)
  if not CFG.gated then return 'ok' end
  if st.state[k.name] == 'disabled' or st.state[k.name] == 'exhausted' then return 'out' end
  if st.cool[k.name] > NOW then return 'cool' end
  return 'ok'
end

local function candidates(st, w)
  if w.key ~= '-' then
    local own = CFG.by_name[w.key]
    if own ~= nil and health(st, own) ~= 'out' then return {own} end
    if not w.fallback then return {} end
  end
  local primaries, reserves, cooling = {}, {}, {}
  for _, k in ipairs(CFG.keys) do
    if k.tier < 2 then
      local h = health(st, k)
      if h == 'ok' then
        if k.tier == 0 then primaries[#primaries + 1] = k else reserves[#reserves + 1] = k end
      elseif h == 'cool' then
        cooling[#cooling + 1] = k
      end
    end
  end
  if #primaries > 0 then return primaries end
  if #reserves > 0 then return reserves end
  return cooling
end

local function pool_free(st)
  if CFG.pool_conc > 0 and st.total >= CFG.pool_conc then return false end
  return st.pool_tat <= NOW + CFG.horizon
end

local function free(st, k)
  return health(st, k) == 'ok' and (st.inflight[k.name] or 0) < k.conc and st.tat[k.name] <= NOW + CFG.horizon
end

local function any_free(st)
  if not pool_free(st) then return false end
  for _, k in ipairs(CFG.keys) do
    if free(st, k) then return true end
  end
  return false
end

local function pick(st, cands)
  if not pool_free(st) then return nil end
  local best, best_load = nil, 0
  for _, k in ipairs(cands) do
    if free(st, k) then
      local load = (st.inflight[k.name] or 0) / (k.conc * k.weight)
      if best == nil or load < best_load then best, best_load = k, load end
    end
  end
  return best
end

local function grant(st, ticket, w, k, v)
  local start = math.max(NOW, st.tat[k.name])
  if CFG.pool_interval > 0 then start = math.max(start, st.pool_tat) end
  redis.call('ZADD', SLOTS, NOW + CFG.lease, ticket)
  redis.call('HSET', GRANTED, ticket, k.name .. '|' .. int(start))
  st.inflight[k.name] = (st.inflight[k.name] or 0) + 1
  st.total = st.total + 1
  local tat = math.ceil(start + k.interval)
  st.tat[k.name] = tat
  redis.call('HSET', TAT, k.name, int(tat))
  if CFG.pool_interval > 0 then
    st.pool_tat = math.ceil(start + CFG.pool_interval)
    redis.call('HSET', TAT, '*', int(st.pool_tat))
  end
  local s = tonumber(w.s)
  if s > v then
    v = s
    redis.call('HSET', FLOWS, 'V', fmt(v))
  end
  drop_waiter(ticket, false)
  local replica = string.match(ticket, '^([^:]*):')
  if replica ~= REPLICA then WOKEN[replica] = true end
  return v, start
end

local function dispatch(st)
  local granted = {}
  if any_free(st) then
    local v = tonumber(redis.call('HGET', FLOWS, 'V') or '0')
    local tickets = redis.call('ZRANGE', WAIT, 0, CFG.scan - 1)
    local infos = {}
    if #tickets > 0 then infos = redis.call('HMGET', WINFO, unpack(tickets)) end
    for i, ticket in ipairs(tickets) do
      if not any_free(st) then break end
      if infos[i] then
        local w = parse_waiter(infos[i])
        local k = pick(st, candidates(st, w))
        if k ~= nil then
          local start
          v, start = grant(st, ticket, w, k, v)
          granted[#granted + 1] = ticket
          granted[#granted + 1] = k.name
          granted[#granted + 1] = start - NOW
        end
      end
    end
  end
  if redis.call('ZCARD', WAIT) == 0 and redis.call('ZCARD', SLOTS) == 0 then
    local lat = redis.call('HGET', FLOWS, 'lat')
    redis.call('DEL', FLOWS)
    if lat then redis.call('HSET', FLOWS, 'lat', lat) end
  end
  return granted
end

local function hint(st)
  local best = 0
  for _, k in ipairs(CFG.keys) do
    if not (CFG.gated and (st.state[k.name] == 'disabled' or st.state[k.name] == 'exhausted')) then
      local t = 0
      if CFG.gated and st.cool[k.name] > NOW then t = st.cool[k.name] end
      if (st.inflight[k.name] or 0) < k.conc and st.tat[k.name] - CFG.horizon > NOW then
        t = math.max(t, st.tat[k.name] - CFG.horizon)
      end
      if t > NOW and (best == 0 or t < best) then best = t end
    end
  end
  if best > 0 and st.pool_tat - CFG.horizon > best then best = st.pool_tat - CFG.horizon end
  if best > 0 then return best - NOW end
  return 0
end

local function rate(st, cands)
  local lat = tonumber(redis.call('HGET', FLOWS, 'lat') or CFG.lat0)
  local r = 0
  for _, k in ipairs(cands) do
    if health(st, k) ~= 'out' then
      local per = k.conc / lat
      if k.interval > 0 then per = math.min(per, 1 / k.interval) end
      r = r + per
    end
  end
  if CFG.pool_interval > 0 then r = math.min(r, 1 / CFG.pool_interval) end
  if CFG.pool_conc > 0 then r = math.min(r, CFG.pool_conc / lat) end
  return r
end

local function earliest_return(st, w)
  local keys = {}
  local own = nil
  if w.key ~= '-' then own = CFG.by_name[w.key] end
  if own ~= nil then keys[#keys + 1] = own end
  if w.key == '-' or w.fallback then
    for _, k in ipairs(CFG.keys) do
      if k.tier < 2 then keys[#keys + 1] = k end
    end
  end
  local best = 0
  for _, k in ipairs(keys) do
    local t = 0
    if st.state[k.name] == 'exhausted' then
      if st.recheck[k.name] > NOW then t = st.recheck[k.name] else t = NOW + CFG.recheck end
    elseif st.state[k.name] ~= 'disabled' then
      t = math.max(st.cool[k.name], NOW)
    end
    if t > 0 and (best == 0 or t < best) then best = t end
  end
  if best > 0 then return best - NOW end
  return 0
end

-- Tell the other replicas whose waiters got slots; ``touch``: keep the structures from living forever
-- (a day after the last call or balance read; every call enqueues, so the other scripts need not).
local function finish(touch)
  local woken = {}
  for replica, _ in pairs(WOKEN) do woken[#woken + 1] = replica end
  if #woken > 0 then redis.call(PUBLISH, CHANNEL, table.concat(woken, ' ')) end
  if touch then
    for i = 1, 8 do redis.call('PEXPIRE', KEYS[i], 86400000) end
  else
    -- A structure this script emptied and filled again (a release's 'lat', a grant) is a new key:
    -- it gets its day too, or it would have no TTL until the next call.
    for i = 1, 8 do
      if redis.call('PTTL', KEYS[i]) == -1 then redis.call('PEXPIRE', KEYS[i], 86400000) end
    end
  end
end
