-- A ticket whose admission or settlement the client could not confirm (timeout, outage, caller
-- gone): free its slot if the admission ran, and mark it void so an admission still on its way
-- (queued behind a stall) takes nothing. KEYS: slots, voided. ARGV: ticket, marker ttl ms.
redis.call('ZREM', KEYS[1], ARGV[1])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
