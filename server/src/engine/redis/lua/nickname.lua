-- One live login per nickname over every node.
--
-- KEYS[1] the nickname's key. ARGV[1] 'hold' or 'release', ARGV[2] the login, ARGV[3]
-- the lease (ms) for 'hold'. Returns 1 when the login holds it (or let it go), 0 while
-- another login does.
local holder = redis.call('GET', KEYS[1])
if ARGV[1] == 'release' then
  if holder == ARGV[2] then
    redis.call('DEL', KEYS[1])
  end
  return 1
end
if holder and holder ~= ARGV[2] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
