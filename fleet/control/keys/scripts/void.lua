-- A ticket whose admission or settlement the client could not confirm (timeout, outage, caller
-- gone): free its slot if the admission ran, and mark it void so an admission still on its way
-- (queued behind a stall) takes nothing. KEYS: slots, void marker. ARGV: ticket, marker ttl ms.
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return 1
