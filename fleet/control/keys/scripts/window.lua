-- Sliding window of 1-second buckets in a HASH. Returns total, and (when over) the ms until
-- enough buckets age out for `need` more to fit under `limit`.
local function window(key, sec, now_ms, limit, need)
  local flat = redis.call('HGETALL', key)
  local total, stale, live = 0, {}, {}
  for i = 1, #flat, 2 do
    local s, v = tonumber(flat[i]), tonumber(flat[i + 1])
    if s <= sec - 60 then
      stale[#stale + 1] = flat[i]
    else
      total = total + v
      live[#live + 1] = {s, v}
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  if limit <= 0 or total + need <= limit then return total, 0 end
  table.sort(live, function(a, b) return a[1] < b[1] end)
  local excess, freed = total + need - limit, 0
  for _, b in ipairs(live) do
    freed = freed + b[2]
    if freed >= excess then return total, math.max(1, (b[1] + 60) * 1000 - now_ms) end
  end
  return total, 60000
end
