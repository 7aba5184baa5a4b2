-- Appends one message to a room, at most once per idempotency key.
--
-- KEYS[1] the room's meta hash, KEYS[2] its log stream, KEYS[3] the message's
-- idempotency key ({room}:sent:...).
-- ARGV[1] the message body (its protobuf encoding without the seq), ARGV[2] when it was
-- sent (µs), ARGV[3] the dedupe window (ms), ARGV[4] the most messages kept (0: all),
-- ARGV[5] the room's feed channel, ARGV[6] an epoch for the room should its meta be gone,
-- ARGV[7..11] the room's name, owner, creation time (µs), private flag and topic, to
-- rebuild its meta then.
--
-- Returns {seq, duplicate (0 or 1), epoch}. Every check comes before the first write: a
-- script that fails half-way does not undo what it wrote.
local original = redis.call('GET', KEYS[3])
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if original and epoch then
  return {tonumber(original), 1, epoch}
end
if not epoch then
  -- The room's data is gone (flushed, or restored from before it existed): start it
  -- again under a new epoch, so no client takes the new seqs for the old ones.
  epoch = ARGV[6]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'head', 0, 'name', ARGV[7],
    'created_by', ARGV[8], 'created_at', ARGV[9], 'private', ARGV[10], 'topic', ARGV[11])
end
local seq = redis.call('HINCRBY', KEYS[1], 'head', 1)
redis.call('XADD', KEYS[2], seq .. '-0', 'm', ARGV[1], 't', ARGV[2])
local keep = tonumber(ARGV[4])
if keep > 0 then
  redis.call('XTRIM', KEYS[2], 'MAXLEN', keep)
end
redis.call('SET', KEYS[3], seq, 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[5], 'm' .. epoch .. ':' .. seq .. ':' .. ARGV[1])
return {seq, 0, epoch}
