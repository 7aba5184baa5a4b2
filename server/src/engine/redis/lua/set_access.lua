-- Records a user's standing in a room and tells every node.
--
-- KEYS[1] the room's access hash. ARGV[1] the user (comparison key), ARGV[2] 'invited',
-- 'banned' or '' (neither), ARGV[3] the feed channel, ARGV[4] the frame to publish.
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
