-- One settlement: charge real usage, return unused reserved tokens, free the slot.
-- Keys: tpm, slots, usage. ticket; bucket (the admission's second); delta: tokens used less
-- those reserved; prompt, completion: tokens used; now: float seconds, for last_used_at.
local function settle(k_tpm, k_slots, k_usage, ticket, bucket, delta, prompt, completion, now)
  redis.call('ZREM', k_slots, ticket)
  if delta ~= 0 then
    local v = redis.call('HGET', k_tpm, bucket)
    if v then
      redis.call('HSET', k_tpm, bucket, math.max(0, tonumber(v) + delta))
    elseif delta > 0 then
      redis.call('HINCRBY', k_tpm, bucket, delta)
      redis.call('PEXPIRE', k_tpm, 61000)
    end
  end
  if prompt > 0 then redis.call('HINCRBY', k_usage, 'prompt_tokens', prompt) end
  if completion > 0 then redis.call('HINCRBY', k_usage, 'completion_tokens', completion) end
  if prompt > 0 or completion > 0 then redis.call('HSET', k_usage, 'last_used_at', now) end
end
