-- One admission: take rpm, tpm and a concurrency slot together (needs window.lua).
-- Keys: rpm, tpm, slots, usage, voided (void.lua). rpm, tpm, maxc: limits (0 = none);
-- reserve: tokens to hold; ticket; ttl_ms: the slot's life. sec, now_ms: Redis TIME.
-- Returns 0, bucket, reserved on admission; code, retry_ms, limit when refused (code 1 rpm,
-- 2 tpm, 3 concurrency); 4, 0, 0 for a ticket voided already (its caller gave up on it, so
-- nobody reads that reply).
local function admit(k_rpm, k_tpm, k_slots, k_usage, k_voided, rpm, tpm, maxc, reserve, ticket,
                     ttl_ms, sec, now_ms)
  if redis.call('ZSCORE', k_voided, ticket) then return 4, 0, 0 end
  if tpm > 0 and reserve > tpm then reserve = tpm end
  if rpm > 0 then
    local _, wait = window(k_rpm, sec, now_ms, rpm, 1)
    if wait > 0 then return 1, wait, rpm end
  end
  if tpm > 0 then
    local _, wait = window(k_tpm, sec, now_ms, tpm, reserve)
    if wait > 0 then return 2, wait, tpm end
  end
  if maxc > 0 then
    redis.call('ZREMRANGEBYSCORE', k_slots, '-inf', now_ms)
    if redis.call('ZCARD', k_slots) >= maxc then return 3, 1000, maxc end
    redis.call('ZADD', k_slots, now_ms + ttl_ms, ticket)
  end
  if rpm > 0 then
    redis.call('HINCRBY', k_rpm, sec, 1)
    redis.call('PEXPIRE', k_rpm, 61000)
  end
  if tpm > 0 and reserve > 0 then
    redis.call('HINCRBY', k_tpm, sec, reserve)
    redis.call('PEXPIRE', k_tpm, 61000)
  end
  redis.call('HINCRBY', k_usage, 'requests', 1)
  return 0, sec, reserve
end
