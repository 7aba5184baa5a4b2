-- Sets a room's topic and tells every node.
--
-- KEYS[1] the room's meta hash. ARGV[1] the topic, ARGV[2] the feed channel, ARGV[3] the
-- frame to publish. Returns 0 if the room is gone, 1 otherwise.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'topic', ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
