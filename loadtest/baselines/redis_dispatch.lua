-- The rotation-and-budget decision of one auto-buy lead (R1, R21, R22's budget check),
-- as a Redis script: the baseline rota is compared with in BENCHMARKS.md.
--
-- ARGV: lead id, number of shards, price (credits), group size.
-- Keys (one set per shard s, loaded by redis.sh):
--   ring:s    sorted set, pro -> pass (the rotation: lowest pass next)
--   budget:s  hash, pro -> available budget (credits)
--   stride:s  hash, pro -> stride (STRIDE_SCALE / weight)
--   leads     hash, lead -> result (idempotency: a repeated lead answers the same)
--   offers    stream of dispatched leads (what a subscriber would read)
-- The shard is the lead id modulo the number of shards, so one random number per
-- request (redis-benchmark's __rand_int__) picks both.
local lead = ARGV[1]
local shard = tonumber(lead) % tonumber(ARGV[2])
local price = tonumber(ARGV[3])
local group = tonumber(ARGV[4])
local done = redis.call('HGET', 'leads', lead)
if done then
  return done
end
local ring = 'ring:' .. shard
local budget = 'budget:' .. shard
local stride = 'stride:' .. shard
local taken = {}
local start = 0
-- Walk the ring in pass order, 16 at a time, taking the first `group` pros whose
-- budget covers the price (a scan skips the others and they keep their place).
while #taken < group do
  local batch = redis.call('ZRANGE', ring, start, start + 15)
  if #batch == 0 then
    break
  end
  for _, pro in ipairs(batch) do
    if tonumber(redis.call('HGET', budget, pro) or '0') >= price then
      taken[#taken + 1] = pro
      if #taken == group then
        break
      end
    end
  end
  start = start + 16
end
for _, pro in ipairs(taken) do
  redis.call('HINCRBY', budget, pro, -price)
  redis.call('ZINCRBY', ring, tonumber(redis.call('HGET', stride, pro)), pro)
end
local result = table.concat(taken, ',')
redis.call('HSET', 'leads', lead, result)
redis.call('XADD', 'offers', '*', 'lead', lead, 'shard', shard, 'price', price, 'pros', result)
return result
