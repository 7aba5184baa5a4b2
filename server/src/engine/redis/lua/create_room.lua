-- Creates a room unless it exists.
--
-- KEYS[1] the room's meta hash. ARGV[1] its epoch, ARGV[2..6] its name, owner, creation
-- time (µs), private flag and topic.
-- Returns 1 if created, 0 if the room exists.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'head', 0, 'name', ARGV[2],
  'created_by', ARGV[3], 'created_at', ARGV[4], 'private', ARGV[5], 'topic', ARGV[6])
return 1
