-- Charge real usage, return unused reserved tokens, free the slot.
-- KEYS: tpm, slots, usage. ARGV: ticket, bucket, token delta (real - reserved), prompt,
-- completion, now (float seconds, for last_used_at).
redis.call('ZREM', KEYS[2], ARGV[1])
local delta = tonumber(ARGV[3])
if delta ~= 0 then
  local v = redis.call('HGET', KEYS[1], ARGV[2])
  if v then
    redis.call('HSET', KEYS[1], ARGV[2], math.max(0, tonumber(v) + delta))
  elseif delta > 0 then
    redis.call('HINCRBY', KEYS[1], ARGV[2], delta)
    redis.call('PEXPIRE', KEYS[1], 61000)
  end
end
local p, c = tonumber(ARGV[4]), tonumber(ARGV[5])
if p > 0 then redis.call('HINCRBY', KEYS[3], 'prompt_tokens', p) end
if c > 0 then redis.call('HINCRBY', KEYS[3], 'completion_tokens', c) end
if p > 0 or c > 0 then redis.call('HSET', KEYS[3], 'last_used_at', ARGV[6]) end
return 1
