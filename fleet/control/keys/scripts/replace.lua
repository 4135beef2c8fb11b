-- Compare-and-set of a record. KEYS: record, old keyhash, new keyhash, index SET, channel.
-- ARGV: expected JSON ('' = must not exist), new JSON, id, old hash for the event ('' = none).
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '' then
  if cur then return 0 end
elseif cur ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[3])
if KEYS[2] ~= KEYS[3] then redis.call('DEL', KEYS[2]) end
if KEYS[3] ~= '' then redis.call('SET', KEYS[3], ARGV[3]) end
redis.call('PUBLISH', KEYS[5], cjson.encode({id = ARGV[3], old_hash = ARGV[4]}))
return 1
