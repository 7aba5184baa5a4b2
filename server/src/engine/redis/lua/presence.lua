-- Presence over every node: a user is present while any node has them; the room hears
-- of a change once, when the first node gains them or the last one loses them.
--
-- KEYS[1] the room's presence hash (user -> how many nodes have them), KEYS[2] one node's
-- set of the room's users. ARGV[1] 'enter', 'exit', 'rename' or 'purge' (a dead node's
-- users all leave), ARGV[2] the feed channel, ARGV[3] the user (old name for 'rename'),
-- ARGV[4] the new name for 'rename'. Frames: 'p<kind>:<user>\n<previous>', kinds
-- 1 joined, 2 left, 3 renamed (PresenceKind).
local function enter(user)
  if redis.call('SADD', KEYS[2], user) == 1 then
    return redis.call('HINCRBY', KEYS[1], user, 1) == 1
  end
  return false
end
local function exit(user)
  if redis.call('SREM', KEYS[2], user) == 1 then
    if redis.call('HINCRBY', KEYS[1], user, -1) <= 0 then
      redis.call('HDEL', KEYS[1], user)
      return true
    end
  end
  return false
end
local function say(kind, user, previous)
  redis.call('PUBLISH', ARGV[2], 'p' .. kind .. ':' .. user .. '\n' .. (previous or ''))
end
local op = ARGV[1]
if op == 'enter' then
  if enter(ARGV[3]) then say(1, ARGV[3]) end
elseif op == 'exit' then
  if exit(ARGV[3]) then say(2, ARGV[3]) end
elseif op == 'rename' then
  local gone = exit(ARGV[3])
  local first = enter(ARGV[4])
  if gone and first then
    say(3, ARGV[4], ARGV[3])
  elseif gone then
    say(2, ARGV[3])
  elseif first then
    say(1, ARGV[4])
  end
elseif op == 'purge' then
  for _, user in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    if exit(user) then say(2, user) end
  end
  redis.call('DEL', KEYS[2])
end
return 1
