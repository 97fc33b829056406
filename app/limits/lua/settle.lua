-- Commit (spent) or refund one reservation, in the periods it was made in.
-- KEYS: 1 daily window hash, 2 monthly window hash. ARGV: 1 day period, 2 month period, 3 'spent' | 'refund'
for i = 1, 2 do
  if redis.call('HGET', KEYS[i], 'period') == ARGV[i] then
    if ARGV[3] == 'spent' then
      redis.call('HINCRBY', KEYS[i], 'spent', 1)
    elseif tonumber(redis.call('HGET', KEYS[i], 'used') or '0') > 0 then
      redis.call('HINCRBY', KEYS[i], 'used', -1)
    end
  end
end
return 1
