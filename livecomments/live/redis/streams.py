"""Post streams in Redis: the keys of one post and the three scripts that read and write them.

Per post, on its shard (TTLs refreshed by every write; positions outlive histories):
* `livecomments:{P}:m`: a hash, `epoch` and `offset` (the last one given). TTL `history.meta_ttl`.
  Also `at`: when the epoch was created (Redis TIME, ms), for ring sweeps (sweep.py).
* `livecomments:{P}:s`: a stream, one entry per publication, id `<offset>-0`, fields `k` (kind)
  and `d` (body); trimmed to about `history.size` entries. TTL `history.ttl`.
* `livecomments:{P}:i`: a sorted set by lexical order, `<20-digit comment id>:<offset>`: which
  comment has which offset (the append's dedupe, and GET's window by id). Trimmed with `:s`.
* `livecomments:{P}:x`: a sorted set of the comment ids deleted in this epoch (by offset), so
  that GET on every instance stops listing a comment as soon as its deletion is published,
  before any database has the tombstone. Trimmed to `history.size`. TTL `history.ttl`.

APPEND is one atomic step per comment: if its id is in `:i` (or, deleted, in `:x`) it returns the
offset it got then (its deletion's) and publishes nothing (the outbox may repeat an append after
a crash); otherwise it creates the
position if there is none (a new epoch, given by the caller: a fresh random string), takes the
next offset, adds the entry and the index row, trims both, and PUBLISHes the envelope
(envelope.py) on the post's channel. HISTORY creates the position too, so the first viewer of a
post that has no comment yet already holds the epoch later comments continue. RECENT reads a
GET window of comments from the index and the stream.
"""

from __future__ import annotations

ID_DIGITS = 20  # a comment id, zero-padded: lexical order is numeric order

APPEND = """
local m, s, i, x = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local channel, id, kind, body, candidate = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local size, ttl, meta_ttl = tonumber(ARGV[6]), ARGV[7], ARGV[8]
local epoch = redis.call('HGET', m, 'epoch')
if epoch then
  local found = redis.call('ZRANGEBYLEX', i, '[' .. id .. ':', '[' .. id .. ';', 'LIMIT', 0, 1)
  if found[1] then
    return {epoch, tonumber(string.sub(found[1], 22)), 0}
  end
  if kind == 'c' then
    -- Its deletion took its index row: a repeated append must not bring it back. (Compared
    -- as text: a snowflake is past 2^53, which Lua's numbers would round.)
    local gone = redis.call('ZSCORE', x, (string.gsub(id, '^0+', '')))
    if gone then
      return {epoch, tonumber(gone), 0}
    end
  end
else
  epoch = candidate
  redis.call('DEL', s, i, x)
  local t = redis.call('TIME')
  redis.call('HSET', m, 'epoch', epoch, 'offset', 0, 'at', t[1] * 1000 + math.floor(t[2] / 1000))
end
local offset = redis.call('HINCRBY', m, 'offset', 1)
if kind == 'd' then
  -- A deletion: its comment leaves the index (RECENT no longer lists it) and joins :x (GET
  -- leaves it out wherever else it finds it: a queue, a database without the tombstone yet).
  local target = string.rep('0', 20 - #body) .. body
  redis.call('ZREMRANGEBYLEX', i, '[' .. target .. ':', '[' .. target .. ';')
  redis.call('ZADD', x, offset, body)
  local deleted = redis.call('ZCARD', x)
  if deleted > size then
    redis.call('ZREMRANGEBYRANK', x, 0, deleted - size - 1)
  end
  redis.call('PEXPIRE', x, ttl)
end
redis.call('XADD', s, 'MAXLEN', '~', size, offset .. '-0', 'k', kind, 'd', body)
redis.call('ZADD', i, 0, id .. ':' .. offset)
local held = redis.call('ZCARD', i)
if held > size then
  redis.call('ZREMRANGEBYRANK', i, 0, held - size - 1)
end
redis.call('PEXPIRE', s, ttl)
redis.call('PEXPIRE', i, ttl)
redis.call('PEXPIRE', x, ttl)
redis.call('PEXPIRE', m, meta_ttl)
redis.call('PUBLISH', channel, '2' .. epoch .. kind .. offset .. '|' .. body)
return {epoch, offset, 1}
"""

# ARGV: since (-1: position only), limit, candidate epoch, meta_ttl.
# Returns {epoch, offset, complete (1/0), entries...} with entries as XRANGE gives them.
HISTORY = """
local m, s = KEYS[1], KEYS[2]
local since, limit, candidate, meta_ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local epoch = redis.call('HGET', m, 'epoch')
if not epoch then
  epoch = candidate
  redis.call('DEL', s, KEYS[3], KEYS[4])
  local t = redis.call('TIME')
  redis.call('HSET', m, 'epoch', epoch, 'offset', 0, 'at', t[1] * 1000 + math.floor(t[2] / 1000))
end
redis.call('PEXPIRE', m, meta_ttl)
local offset = tonumber(redis.call('HGET', m, 'offset'))
if since < 0 or since == offset then
  return {epoch, offset, 1, {}}
end
if since > offset then
  -- Past the stream's end in its own epoch: the shard lost offsets it gave (a restored
  -- snapshot, a promoted replica): the offsets will be given again, to other comments.
  return {epoch, offset, 0, {}}
end
local entries = redis.call('XRANGE', s, (since + 1) .. '-0', '+', 'COUNT', limit)
local first = entries[1]
if not first or first[1] ~= (since + 1) .. '-0' then
  return {epoch, offset, 0, {}}
end
return {epoch, offset, 1, entries}
"""

# ARGV: min, max (ZRANGEBYLEX bounds), count, newest (1: the newest `count`, 0: the oldest).
# Returns the bodies of the comments (kind c) in the window, any order.
RECENT = """
local i, s = KEYS[1], KEYS[2]
local min, max, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
local newest = ARGV[4] == '1'
local out = {}
-- Deletions have index rows too (their own id, for the append's dedupe): read on past them
-- until the window holds `count` comments or the index ends.
while #out < count do
  local rows
  if newest then
    rows = redis.call('ZREVRANGEBYLEX', i, max, min, 'LIMIT', 0, count - #out)
  else
    rows = redis.call('ZRANGEBYLEX', i, min, max, 'LIMIT', 0, count - #out)
  end
  if not rows[1] then
    break
  end
  for _, row in ipairs(rows) do
    local offset = string.sub(row, 22)
    local entry = redis.call('XRANGE', s, offset .. '-0', offset .. '-0')
    if entry[1] and entry[1][2][2] == 'c' then
      out[#out + 1] = entry[1][2][4]
    end
  end
  if newest then
    max = '(' .. rows[#rows]
  else
    min = '(' .. rows[#rows]
  end
end
return out
"""


def keys(post_id: str) -> list[str]:
    """The position, stream, index and deleted-ids keys of a post, in the scripts' KEYS order."""
    base = f"livecomments:{{{post_id}}}:"
    return [base + "m", base + "s", base + "i", base + "x"]


def padded(comment_id: int) -> str:
    return f"{comment_id:0{ID_DIGITS}d}"
