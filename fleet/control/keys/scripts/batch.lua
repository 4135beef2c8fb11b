-- The admissions and settlements of one event-loop tick, applied in order (needs window.lua,
-- admit.lua, settle.lua): the same checks, atomically, as one call each would make.
-- KEYS: each operation's keys in turn: an admission's rpm, tpm, slots, usage and voided; a
-- settlement's tpm, slots and usage. ARGV[1]: now (float seconds, for last_used_at);
-- ARGV[2]: a slot's ttl in ms; then one per operation: 'a rpm tpm max_concurrent reserve
-- ticket' or 's ticket bucket delta prompt completion'. Returns one string: three integers
-- per admission, in order, separated by spaces (one reply to parse, not an array of them).
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now_ms = sec * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local out, k = {}, 1
for i = 3, #ARGV do
  local op = ARGV[i]
  if string.byte(op, 1) == 97 then -- 'a'
    local rpm, tpm, maxc, reserve, ticket =
      string.match(op, '^a (%d+) (%d+) (%d+) (%d+) (%S+)$')
    local code, a, b = admit(KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4],
      tonumber(rpm), tonumber(tpm), tonumber(maxc), tonumber(reserve), ticket, ttl, sec, now_ms)
    out[#out + 1] = string.format('%d %d %d', code, a, b)
    k = k + 5
  else
    local ticket, bucket, delta, prompt, completion =
      string.match(op, '^s (%S+) (%d+) (%-?%d+) (%d+) (%d+)$')
    settle(KEYS[k], KEYS[k + 1], KEYS[k + 2], ticket, bucket, tonumber(delta), tonumber(prompt),
      tonumber(completion), ARGV[1])
    k = k + 3
  end
end
return table.concat(out, ' ')
