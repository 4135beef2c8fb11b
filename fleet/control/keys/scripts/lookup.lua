-- A record by its secret's digest in one round trip.
-- KEYS: keyhash. ARGV: record key prefix. -> record JSON or nil.
local id = redis.call('GET', KEYS[1])
if not id then return false end
return redis.call('GET', ARGV[1] .. id)
