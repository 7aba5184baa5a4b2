-- Removes a room's messages sent before a time.
--
-- KEYS[1] the room's log. ARGV[1] the cutoff (µs since the Unix epoch): entries whose 't'
-- is older go. Returns how many were removed.
local cutoff = tonumber(ARGV[1])
local removed = 0
while true do
  local entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 128)
  if #entries == 0 then
    return removed
  end
  for _, entry in ipairs(entries) do
    local fields = entry[2]
    local sent
    for i = 1, #fields, 2 do
      if fields[i] == 't' then sent = tonumber(fields[i + 1]) end
    end
    if sent and sent >= cutoff then
      return removed + redis.call('XTRIM', KEYS[1], 'MINID', entry[1])
    end
  end
  -- Every entry read is older: remove through the last of them.
  local last = entries[#entries][1]
  local seq = tonumber(string.match(last, '^(%d+)-'))
  removed = removed + redis.call('XTRIM', KEYS[1], 'MINID', (seq + 1) .. '-0')
end
