-- Take rpm, tpm and a concurrency slot together (runs after window.lua).
-- KEYS: rpm, tpm, slots, usage, the ticket's void marker. ARGV: rpm, tpm, max_concurrent
-- (0 = none), reserve, ticket, slot_ttl_ms. Returns {0, bucket, reserved} on admission,
-- {code, retry_ms, limit} when refused (code 1 rpm, 2 tpm, 3 concurrency), {4, 0, 0} for a ticket
-- voided already (its caller gave up on it, so nobody reads that reply).
if redis.call('EXISTS', KEYS[5]) == 1 then return {4, 0, 0} end
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now_ms = sec * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, tpm, maxc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reserve = tonumber(ARGV[4])
if tpm > 0 and reserve > tpm then reserve = tpm end
if rpm > 0 then
  local _, wait = window(KEYS[1], sec, now_ms, rpm, 1)
  if wait > 0 then return {1, wait, rpm} end
end
if tpm > 0 then
  local _, wait = window(KEYS[2], sec, now_ms, tpm, reserve)
  if wait > 0 then return {2, wait, tpm} end
end
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms)
  if redis.call('ZCARD', KEYS[3]) >= maxc then return {3, 1000, maxc} end
  redis.call('ZADD', KEYS[3], now_ms + tonumber(ARGV[6]), ARGV[5])
end
if rpm > 0 then
  redis.call('HINCRBY', KEYS[1], sec, 1)
  redis.call('PEXPIRE', KEYS[1], 61000)
end
if tpm > 0 and reserve > 0 then
  redis.call('HINCRBY', KEYS[2], sec, reserve)
  redis.call('PEXPIRE', KEYS[2], 61000)
end
redis.call('HINCRBY', KEYS[4], 'requests', 1)
return {0, sec, reserve}
