//! The Lua scripts that keep a namespace's counts in Redis, and one typed
//! call per script.
//!
//! [`RedisLimiter`](crate::RedisLimiter) is built on these calls. They are
//! public for tools and tests that need one round trip at a time, such as a
//! status command or a test of a single reply.
//!
//! Every script reads the time with Redis `TIME`, never from the client.
//! Each receives every key it touches in `KEYS`, all under the `{NAME}` hash
//! tag, so one script may touch them all, also on Redis Cluster. Normal
//! outcomes come back as integers and arrays, never as error replies.

use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Script, Value};

use crate::error::Error;

/// The lease used when the namespace stores none, in milliseconds.
pub const DEFAULT_LEASE_MS: u64 = 30_000;

/// The maximum retry hint of a busy reply, in milliseconds.
const HINT_CAP_MS: u64 = 60_000;

/// The waiter TTL of [`Scripts::acquire`]: three times the default
/// [`Options::poll_max`](crate::Options::poll_max).
pub const DEFAULT_WAITER_TTL: Duration = Duration::from_secs(3);

/// A validated namespace name and the Redis key names derived from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    name: String,
}

impl Namespace {
    /// Validates `name`, which must be non-empty and free of `{`, `}` and
    /// whitespace because it becomes the hash tag `{NAME}` of every key.
    pub fn new(name: &str) -> Result<Self, Error> {
        if name.is_empty() {
            return Err(Error::Config(
                "the limiter namespace is empty; pass a name such as `smtp`".into(),
            ));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| *c == '{' || *c == '}' || c.is_whitespace())
        {
            return Err(Error::Config(format!(
                "invalid limiter namespace {name:?}: it contains {bad:?}, but a namespace \
                 must not contain `{{`, `}}` or whitespace; pick a name such as `smtp`"
            )));
        }
        Ok(Self {
            name: name.to_owned(),
        })
    }

    /// Returns the namespace name as given.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `dsr:{NAME}:meta`: hash of `epoch`, `grace_until`, `fence` and
    /// `run_id` (of the Redis server process that last wrote it), without a
    /// TTL, so that its absence means the state was lost.
    pub fn meta_key(&self) -> String {
        format!("dsr:{{{}}}:meta", self.name)
    }

    /// `dsr:{NAME}:limits`: hash of `global`, `default`, `lease_ms` and
    /// `k:<key>` for each key with its own limit.
    pub fn limits_key(&self) -> String {
        format!("dsr:{{{}}}:limits", self.name)
    }

    /// `dsr:{NAME}:h` for the global count, `dsr:{NAME}:h:<key>` for a
    /// key: sorted set of lease ids scored by expiry in server milliseconds.
    pub fn holders_key(&self, key: Option<&str>) -> String {
        match key {
            Some(key) => format!("dsr:{{{}}}:h:{key}", self.name),
            None => format!("dsr:{{{}}}:h", self.name),
        }
    }

    /// `dsr:{NAME}:l:<lease_id>`: hash of `holder`, `fence`, `acquired_at`
    /// and `key` with the lease's expiry, and `released` once released.
    pub fn lease_key(&self, lease_id: &str) -> String {
        format!("dsr:{{{}}}:l:{lease_id}", self.name)
    }

    /// Returns the [`WaiterKeys`] of the global count (`key` `None`) or of
    /// a key's count.
    pub fn waiter_keys(&self, key: Option<&str>) -> WaiterKeys {
        let name = |kind: &str| match key {
            Some(key) => format!("dsr:{{{}}}:{kind}:{key}", self.name),
            None => format!("dsr:{{{}}}:{kind}", self.name),
        };
        WaiterKeys {
            queue: name("w"),
            expiry: name("we"),
            named: name("wn"),
        }
    }

    /// `dsr:{NAME}:wake`: the wake channel. A message `@<token>:<key>`
    /// names the waiting process whose turn it is (`<key>` empty for a
    /// global acquire). On an empty message every waiter retries. Any
    /// other message is a key whose capacity grew, as sent by releases of
    /// earlier versions.
    pub fn wake_channel(&self) -> String {
        format!("dsr:{{{}}}:wake", self.name)
    }
}

/// The Redis keys that queue the processes waiting for one count (the
/// global count or one key's). A member is `<token>:<key>`: the token of
/// the waiting limiter and the key of its acquire (empty for a global
/// acquire).
///
/// A busy reply to an acquire adds its member to the queue of the count that
/// blocked it, and a grant removes it. A release that frees room in a
/// count names the oldest live member not yet named on the wake channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaiterKeys {
    /// `dsr:{NAME}:w` or `dsr:{NAME}:w:<key>`: sorted set of members
    /// scored by the server time in ms of their first busy reply.
    pub queue: String,
    /// `dsr:{NAME}:we` or `dsr:{NAME}:we:<key>`: sorted set of members
    /// scored by expiry in server ms: the last busy reply plus the waiter
    /// TTL. An expired member is dropped, as a waiter that died or gave up.
    pub expiry: String,
    /// `dsr:{NAME}:wn` or `dsr:{NAME}:wn:<key>`: hash of the members named
    /// since their last busy reply; a release skips them.
    pub named: String,
}

/// Helpers shared by the scripts.
const PROLOGUE: &str = r#"
local function server_now()
  local t = redis.call('TIME')
  local us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  return math.floor(us / 1000), us
end

local function int(n)
  return string.format('%.0f', n)
end

-- The namespace's lease; the client's cached copy stands in while the
-- limits hash is gone, so that a grace after a loss lasts one real lease.
local function lease_of(limits_key, fallback)
  local v = redis.call('HGET', limits_key, 'lease_ms')
  if v then return tonumber(v) end
  if fallback and fallback > 0 then return fallback end
  return 30000
end

-- The run id of this server process: it changes with every start and
-- differs between a primary and its replicas.
local function server_run_id()
  return string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or ''
end

-- Reads epoch, grace end and last fence. A missing meta hash means the
-- state was lost or never existed: recreate it and grant nothing for one
-- lease, so that every holder from before the loss has stopped. With
-- `may_create` false (no limits stored, so nothing can be granted yet) it
-- is left missing, so that the grace starts with the lease the limits
-- will set, not with a fallback.
local function load_meta(meta_key, now, now_us, lease, token, may_create)
  local m = redis.call('HMGET', meta_key, 'epoch', 'grace_until', 'fence')
  if m[1] then
    return m[1], tonumber(m[2]) or 0, tonumber(m[3]) or 0, false
  end
  if not may_create then
    return '', 0, 0, true
  end
  local epoch = int(now_us) .. '-' .. token
  local grace_until = now + lease
  redis.call('HSET', meta_key, 'epoch', epoch, 'grace_until', int(grace_until), 'fence', 0,
    'run_id', server_run_id())
  return epoch, grace_until, 0, true
end

-- Starts a grace of one lease from now (never shortening one under way)
-- and a new epoch, so that every holder sees its lease lost at its next
-- renewal. Returns the new epoch.
local function start_grace(meta_key, now, now_us, lease, token, grace_until)
  local epoch = int(now_us) .. '-' .. token
  local until_ms = math.max(grace_until, now + lease)
  redis.call('HSET', meta_key, 'epoch', epoch, 'grace_until', int(until_ms))
  return epoch
end

-- Sets a TTL of at least ms on key, never shortening one.
local function extend_ttl(key, ms)
  local pttl = redis.call('PTTL', key)
  if pttl == -1 or (pttl >= 0 and pttl < ms) then
    redis.call('PEXPIRE', key, ms)
  end
end

-- A waiter queue is the table {queue, expiry, named} of WaiterKeys.
local function forget_waiter(w, member)
  redis.call('ZREM', w[1], member)
  redis.call('ZREM', w[2], member)
  redis.call('HDEL', w[3], member)
end

-- Queues member behind earlier waiters (or keeps its place) and moves its
-- expiry to now + ttl.
local function add_waiter(w, member, now, ttl)
  redis.call('ZADD', w[1], 'NX', now, member)
  redis.call('ZADD', w[2], now + ttl, member)
  redis.call('HDEL', w[3], member)
  for _, k in ipairs(w) do extend_ttl(k, ttl + 1000) end
end

-- Names up to n of the oldest live waiters not named yet, each with one
-- message '@' .. member on channel, and drops expired waiters met on the
-- way. Looks at no more than 100 members per call.
local function wake_oldest(w, n, now, channel)
  local gone = redis.call('ZRANGEBYSCORE', w[2], '-inf', now, 'LIMIT', 0, 100)
  for _, member in ipairs(gone) do forget_waiter(w, member) end
  local rank = 0
  local named = 0
  for _ = 1, 100 do
    if named >= n then break end
    local member = redis.call('ZRANGE', w[1], rank, rank)[1]
    if not member then break end
    local expiry = tonumber(redis.call('ZSCORE', w[2], member))
    if not expiry or expiry <= now then
      forget_waiter(w, member)
    elseif redis.call('HEXISTS', w[3], member) == 1 then
      rank = rank + 1
    else
      redis.call('HSET', w[3], member, now)
      redis.call('PUBLISH', channel, '@' .. member)
      named = named + 1
      rank = rank + 1
    end
  end
end

-- The limit of key from the limits hash, or nil when it has none.
local function key_limit(limits_key, key)
  local limit = tonumber(redis.call('HGET', limits_key, 'k:' .. key))
  if not limit then limit = tonumber(redis.call('HGET', limits_key, 'default')) end
  return limit
end

-- Names as many waiters of a count as its set has free places, at most
-- freed, after removing the expired leases.
local function wake_for_room(set, w, limit, freed, now, channel)
  if not limit or freed < 1 then return end
  redis.call('ZREMRANGEBYSCORE', set, '-inf', now)
  local room = limit - redis.call('ZCARD', set)
  if room > 0 then wake_oldest(w, math.min(room, freed), now, channel) end
end
"#;

/// KEYS: meta, limits, global set, lease hash, the global waiter queue (3
/// keys), then for a key: key set and its waiter queue (3 keys), then the
/// lease hash of each extra lease id.
/// ARGV: lease id, holder, key or '', token, fallback lease ms, hint cap ms,
/// waiter TTL ms, wake channel, the number of local waiters behind the
/// caller, then the extra lease ids of a batch.
///
/// NOTE: this script does not compare the server's run id, because `INFO`
/// costs about as much as the whole script. After a restart from an older
/// snapshot it grants beside the vanished leases until the first renew call
/// of any client starts the grace, and those grants are then lost too.
/// Returns {status, value, epoch, lease_ms, global limit or -1, extra}:
/// status 0 granted (value = fence, extra = expiry, then a seventh item:
/// 1 or 2 when the grant queued the next waiter for the global or the
/// key's count, else 0, and an eighth item: the fences of the extra leases
/// granted, in the order of their ids), 1 busy (value = retry hint ms,
/// extra = 1 when the global count is full), 2 grace (value = wait ms),
/// 3 no global limit.
///
/// A busy reply queues `token:key` as a waiter of the count that blocked it
/// (the global count when both are full) and removes it from the other
/// queue. A grant removes it from both.
///
/// A grant also takes the first extra lease ids while both counts have
/// room. The leases in all are at most the free places divided by one plus
/// the number of live waiters of other limiters queued for these counts,
/// and at least the caller's one lease. Each lease gets its own fence, one
/// above the one before.
///
/// When more local waiters stand behind the caller than the grant took
/// extra leases for, a grant that fills a count queues the member again at
/// once, for the caller's next local waiter, which then waits for its name
/// instead of a try that would be busy. Leases found expired here free
/// room, and that room names waiters as a release does.
const ACQUIRE: &str = r#"
local now, now_us = server_now()
local lease = lease_of(KEYS[2], tonumber(ARGV[5]))
local global = tonumber(redis.call('HGET', KEYS[2], 'global'))
if not global then
  return {3, 0, redis.call('HGET', KEYS[1], 'epoch') or '', lease, -1, 0}
end
local epoch, grace_until, fence = load_meta(KEYS[1], now, now_us, lease, ARGV[4], true)
if now < grace_until then
  return {2, grace_until - now, epoch, lease, global, 0}
end
local keyed = ARGV[3] ~= ''
local member = ARGV[4] .. ':' .. ARGV[3]
local channel = ARGV[8]
local global_waiters = {KEYS[5], KEYS[6], KEYS[7]}
local key_waiters = {KEYS[9], KEYS[10], KEYS[11]}
local cap = tonumber(ARGV[6])
local hint = cap
local function has_room(set, limit)
  local reaped = redis.call('ZREMRANGEBYSCORE', set, '-inf', now)
  if not limit then return true, reaped end
  if redis.call('ZCARD', set) < limit then return true, reaped end
  local first = redis.call('ZRANGE', set, 0, 0, 'WITHSCORES')
  if first[2] and tonumber(first[2]) - now < hint then
    hint = tonumber(first[2]) - now
  end
  return false, reaped
end
local global_room, global_reaped = has_room(KEYS[3], global)
local key_room, key_reaped, limit = true, 0, nil
if keyed then
  limit = key_limit(KEYS[2], ARGV[3])
  key_room, key_reaped = has_room(KEYS[8], limit)
end
local function wake_reaped()
  wake_for_room(KEYS[3], global_waiters, global, global_reaped, now, channel)
  if keyed then
    wake_for_room(KEYS[8], key_waiters, limit, key_reaped, now, channel)
  end
end
if not (global_room and key_room) then
  local ttl = tonumber(ARGV[7])
  if not global_room then
    add_waiter(global_waiters, member, now, ttl)
    if keyed then forget_waiter(key_waiters, member) end
  else
    add_waiter(key_waiters, member, now, ttl)
    forget_waiter(global_waiters, member)
  end
  wake_reaped()
  if hint < 1 then hint = 1 end
  local global_full = 0
  if not global_room then global_full = 1 end
  return {1, hint, epoch, lease, global, global_full}
end
forget_waiter(global_waiters, member)
if keyed then forget_waiter(key_waiters, member) end
-- The batch size: the lease ids given, cut to the free places and to a
-- fair share when other limiters wait for these counts.
local extra_ids = #ARGV - 9
local batch = 1
if extra_ids > 0 then
  local free = global - redis.call('ZCARD', KEYS[3])
  if keyed and limit then
    free = math.min(free, limit - redis.call('ZCARD', KEYS[8]))
  end
  local own = ARGV[4] .. ':'
  local others = 0
  local queues = {global_waiters}
  if keyed then queues[2] = key_waiters end
  for _, w in ipairs(queues) do
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', w[2], '(' .. int(now), '+inf', 'LIMIT', 0, 100)) do
      if string.sub(m, 1, #own) ~= own then others = others + 1 end
    end
  end
  batch = math.max(1, math.min(1 + extra_ids, math.floor(free / (1 + others))))
end
local expiry = now + lease
local first_fence = math.max(fence + 1, now_us)
local first_key = 8
if keyed then first_key = 12 end
local fences = {}
for i = 1, batch do
  local id, info = ARGV[1], KEYS[4]
  if i > 1 then id, info = ARGV[8 + i], KEYS[first_key + i - 2] end
  local lease_fence = first_fence + i - 1
  redis.call('ZADD', KEYS[3], expiry, id)
  if keyed then redis.call('ZADD', KEYS[8], expiry, id) end
  redis.call('HSET', info, 'holder', ARGV[2], 'fence', int(lease_fence), 'acquired_at', int(now), 'key', ARGV[3])
  redis.call('PEXPIRE', info, lease)
  if i > 1 then fences[#fences + 1] = lease_fence end
end
redis.call('HSET', KEYS[1], 'fence', int(first_fence + batch - 1))
extend_ttl(KEYS[3], lease + 1000)
if keyed then extend_ttl(KEYS[8], lease + 1000) end
wake_reaped()
local queued = 0
if tonumber(ARGV[9]) >= batch then
  local ttl = tonumber(ARGV[7])
  if redis.call('ZCARD', KEYS[3]) >= global then
    add_waiter(global_waiters, member, now, ttl)
    queued = 1
  elseif keyed and limit and redis.call('ZCARD', KEYS[8]) >= limit then
    add_waiter(key_waiters, member, now, ttl)
    queued = 2
  end
end
return {0, first_fence, epoch, lease, global, expiry, queued, fences}
"#;

/// KEYS: meta, limits, global set, then per lease: lease hash, key set (the
/// global set again for a lease without a key).
/// ARGV: token, fallback lease ms, then per lease: lease id, expected expiry
/// ms (the expiry the client last got for it, 0 when unknown).
/// Returns {epoch, lease_ms, new expiry ms, 1 renewed | 0 lost, ...}. A
/// member that is missing or already expired is lost and removed, never
/// renewed.
///
/// Redis can lose writes and keep the meta hash, as after a restart from an
/// older snapshot or a failover to a replica that was behind. Two signs
/// show it. The meta hash was stamped by another server process (its
/// `run_id` differs), or a lease is missing from its set before the expiry
/// its holder last got, although no release marked its lease hash. Either
/// starts a grace of one lease and a new epoch, and every lease of the call
/// is lost.
const RENEW: &str = r#"
local now, now_us = server_now()
local lease = lease_of(KEYS[2], tonumber(ARGV[2]))
local limits_exist = redis.call('EXISTS', KEYS[2]) == 1
local epoch, grace_until, _, created =
  load_meta(KEYS[1], now, now_us, lease, ARGV[1], limits_exist)
local count = (#ARGV - 2) / 2
local data_lost = false
if not created then
  local run_id = server_run_id()
  local stamped = redis.call('HGET', KEYS[1], 'run_id')
  if stamped ~= run_id then
    -- A meta hash from before the run id was stored only gets stamped.
    if stamped then data_lost = true end
    redis.call('HSET', KEYS[1], 'run_id', run_id)
  end
  for j = 1, count do
    local id = ARGV[1 + 2 * j]
    local expected = tonumber(ARGV[2 + 2 * j]) or 0
    if now < expected and redis.call('HEXISTS', KEYS[2 + 2 * j], 'released') == 0 then
      for _, s in ipairs({KEYS[3], KEYS[3 + 2 * j]}) do
        if not redis.call('ZSCORE', s, id) then data_lost = true end
      end
    end
  end
  if data_lost then
    epoch = start_grace(KEYS[1], now, now_us, lease, ARGV[1], grace_until)
  end
end
local expiry = now + lease
local out = {epoch, lease, expiry}
for j = 1, count do
  local id = ARGV[1 + 2 * j]
  local info = KEYS[2 + 2 * j]
  local set = KEYS[3 + 2 * j]
  local live = not (created or data_lost)
  for _, s in ipairs({KEYS[3], set}) do
    local score = redis.call('ZSCORE', s, id)
    if not score or tonumber(score) <= now then live = false end
  end
  if live then
    for _, s in ipairs({KEYS[3], set}) do
      redis.call('ZADD', s, 'XX', expiry, id)
      extend_ttl(s, lease + 1000)
    end
    redis.call('PEXPIRE', info, lease)
    out[#out + 1] = 1
  else
    redis.call('ZREM', KEYS[3], id)
    redis.call('ZREM', set, id)
    redis.call('DEL', info)
    out[#out + 1] = 0
  end
end
return out
"#;

/// KEYS: limits, global set, lease hash, the global waiter queue (3 keys),
/// then for a key: key set and its waiter queue (3 keys).
/// ARGV: lease id, wake channel, key or ''.
/// Returns the number of set members removed. For each count that then has
/// room, names its oldest live waiter on the wake channel.
///
/// The lease hash stays until its own expiry, marked `released`, so that a
/// renewal sent before the release does not take the missing member for
/// lost data.
const RELEASE: &str = r#"
local now = server_now()
local keyed = ARGV[3] ~= ''
local removed = redis.call('ZREM', KEYS[2], ARGV[1])
local key_removed = 0
if keyed then
  key_removed = redis.call('ZREM', KEYS[7], ARGV[1])
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], 'released', 1)
end
local global = tonumber(redis.call('HGET', KEYS[1], 'global'))
wake_for_room(KEYS[2], {KEYS[4], KEYS[5], KEYS[6]}, global, removed, now, ARGV[2])
if keyed then
  local limit = key_limit(KEYS[1], ARGV[3])
  wake_for_room(KEYS[7], {KEYS[8], KEYS[9], KEYS[10]}, limit, key_removed, now, ARGV[2])
end
return removed + key_removed
"#;

/// KEYS: meta, limits, then for the field `global` or `k:<key>`: the
/// count's set and its waiter queue (3 keys). ARGV: field, value or '' to
/// delete, wake channel, token, fallback lease ms. Writes one limit and
/// creates a missing meta hash (which starts a grace). A new limit of a
/// count given in KEYS names as many of its waiters as it has free places.
/// Any other change publishes an empty message, on which every waiter
/// retries. Returns 1.
const SET_LIMIT: &str = r#"
local now, now_us = server_now()
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
local lease = lease_of(KEYS[2], tonumber(ARGV[5]))
load_meta(KEYS[1], now, now_us, lease, ARGV[4], true)
if KEYS[3] and ARGV[2] ~= '' then
  local limit = tonumber(ARGV[2])
  wake_for_room(KEYS[3], {KEYS[4], KEYS[5], KEYS[6]}, limit, limit, now, ARGV[3])
else
  redis.call('PUBLISH', ARGV[3], '')
end
return 1
"#;

/// KEYS: limits. ARGV: field, value pairs. Writes them only when the limits
/// hash does not exist, so a limit set meanwhile by an operator wins.
/// Returns 1 when written.
const RESTORE_LIMITS: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"#;

/// The reply of [`Scripts::acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcquireReply {
    /// A lease was added to every requested set.
    Granted {
        /// The fencing token: `max(last + 1, server time in µs)`.
        fence: u64,
        /// The lease's expiry in server milliseconds since the epoch.
        expiry_ms: u64,
        /// The namespace epoch the lease belongs to.
        epoch: String,
        /// The namespace's lease.
        lease: Duration,
        /// The stored global limit.
        global_limit: u64,
    },
    /// A requested set is full, so nothing was taken.
    Busy {
        /// The time until the earliest lease of a full set expires, at
        /// least 1 ms and capped.
        retry_in: Duration,
        /// Whether the global count is among the full ones.
        global_full: bool,
        /// The namespace's lease.
        lease: Duration,
        /// The stored global limit.
        global_limit: u64,
    },
    /// The namespace's state was lost or is new, so nothing is granted
    /// until one lease has passed.
    Grace {
        /// The time left in the grace.
        wait: Duration,
        /// The namespace's lease.
        lease: Duration,
    },
    /// No global limit is stored.
    NoLimit,
}

/// The reply of [`Scripts::acquire_waiting`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquireOutcome {
    /// The reply of the try.
    pub reply: AcquireReply,
    /// The count whose waiter queue the grant put the caller's member in,
    /// when it asked for that and the grant left the count full.
    pub queued_next: Option<QueuedCount>,
    /// The fences of the extra leases a grant took, one per extra lease id
    /// from the first, each above the one before. Empty for a single grant
    /// and for every other reply.
    pub extra_fences: Vec<u64>,
}

/// One try of [`Scripts::acquire_batch`].
#[derive(Debug, Clone, Copy)]
pub struct AcquireRequest<'a> {
    /// The lease id of the caller's own lease.
    pub lease_id: &'a str,
    /// Lease ids for the local waiters behind the caller, taken in order
    /// while the counts have room.
    pub extra_lease_ids: &'a [String],
    /// The holder name stored with each lease.
    pub holder: &'a str,
    /// The limited key, or `None` for the global count only.
    pub key: Option<&'a str>,
    /// The caller's limiter token, which names it in the waiter queues.
    pub token: &'a str,
    /// The lease to use when the limits hash stores none.
    pub fallback_lease: Duration,
    /// How long a busy reply keeps the caller queued.
    pub waiter_ttl: Duration,
    /// The number of local waiters behind the caller.
    pub followers: usize,
}

/// The count a member was queued for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueuedCount {
    /// The global count.
    Global,
    /// The key's count.
    Key,
}

/// The reply of [`Scripts::renew`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewReply {
    /// The namespace epoch. A change means every older lease is lost.
    pub epoch: String,
    /// The namespace's lease.
    pub lease: Duration,
    /// The new expiry of every renewed lease, in server milliseconds since
    /// the epoch.
    pub expiry_ms: u64,
    /// Per lease in request order: `true` when renewed, `false` when lost.
    pub renewed: Vec<bool>,
}

/// A lease as named in a [`Scripts::renew`] or [`Scripts::release`] call.
#[derive(Debug, Clone, Copy)]
pub struct LeaseRef<'a> {
    /// The lease id.
    pub lease_id: &'a str,
    /// The key of a keyed lease.
    pub key: Option<&'a str>,
}

/// The limiter's Lua scripts with their SHA1 hashes. `redis::Script` sends
/// `EVALSHA` and loads a script again when the server replies `NOSCRIPT`,
/// as after a restart.
#[derive(Debug)]
pub struct Scripts {
    acquire: Script,
    renew: Script,
    release: Script,
    set_limit: Script,
    restore_limits: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}

impl Scripts {
    /// Prepares every script by computing its hash. Nothing is sent to
    /// Redis.
    pub fn new() -> Self {
        let with_prologue = |body: &str| Script::new(&format!("{PROLOGUE}\n{body}"));
        Self {
            acquire: with_prologue(ACQUIRE),
            renew: with_prologue(RENEW),
            release: with_prologue(RELEASE),
            set_limit: with_prologue(SET_LIMIT),
            restore_limits: Script::new(RESTORE_LIMITS),
        }
    }

    /// Tries once to add `lease_id` to the global set and, with `key`, to
    /// the key's set, all or nothing.
    ///
    /// `token` goes into a new epoch if the namespace state must be
    /// recreated, and names the caller in the waiter queues.
    /// `fallback_lease` is the lease to use when the limits hash stores no
    /// `lease_ms` (zero means 30 s). A busy reply queues the caller as a
    /// waiter for [`DEFAULT_WAITER_TTL`], as
    /// [`acquire_waiting`](Self::acquire_waiting) describes.
    #[allow(clippy::too_many_arguments)]
    pub async fn acquire<C: ConnectionLike>(
        &self,
        con: &mut C,
        namespace: &Namespace,
        lease_id: &str,
        holder: &str,
        key: Option<&str>,
        token: &str,
        fallback_lease: Duration,
    ) -> Result<AcquireReply, redis::RedisError> {
        self.acquire_waiting(
            con,
            namespace,
            lease_id,
            holder,
            key,
            token,
            fallback_lease,
            DEFAULT_WAITER_TTL,
            false,
        )
        .await
        .map(|outcome| outcome.reply)
    }

    /// Tries once to acquire as [`acquire`](Self::acquire) does, with the
    /// waiter TTL of a busy reply as a parameter. The member
    /// `<token>:<key>` stays queued in [`WaiterKeys`] for `waiter_ttl` after
    /// its last busy reply. A caller that retries at least every `poll_max`
    /// should pass more than that, such as `3 × poll_max`.
    ///
    /// With `queue_next`, a grant that leaves the global or the key's count
    /// full queues the member at once, as a busy reply would, for a local
    /// waiter that comes next. [`AcquireOutcome::queued_next`] names the
    /// count it was queued for.
    #[allow(clippy::too_many_arguments)]
    pub async fn acquire_waiting<C: ConnectionLike>(
        &self,
        con: &mut C,
        namespace: &Namespace,
        lease_id: &str,
        holder: &str,
        key: Option<&str>,
        token: &str,
        fallback_lease: Duration,
        waiter_ttl: Duration,
        queue_next: bool,
    ) -> Result<AcquireOutcome, redis::RedisError> {
        let request = AcquireRequest {
            lease_id,
            extra_lease_ids: &[],
            holder,
            key,
            token,
            fallback_lease,
            waiter_ttl,
            followers: usize::from(queue_next),
        };
        self.acquire_batch(con, namespace, &request).await
    }

    /// Tries once to acquire as [`acquire_waiting`](Self::acquire_waiting)
    /// does, and on a grant also takes leases for as many of
    /// `request.extra_lease_ids` (from the first) as both counts have room
    /// for, within a fair share when other limiters are queued for these
    /// counts. [`AcquireOutcome::extra_fences`] returns their fences.
    ///
    /// A grant that leaves a count full queues the member for the next
    /// local waiter when `request.followers` is at least the number of
    /// leases granted.
    pub async fn acquire_batch<C: ConnectionLike>(
        &self,
        con: &mut C,
        namespace: &Namespace,
        request: &AcquireRequest<'_>,
    ) -> Result<AcquireOutcome, redis::RedisError> {
        let AcquireRequest {
            lease_id,
            extra_lease_ids,
            holder,
            key,
            token,
            ..
        } = *request;
        let mut call = self.acquire.prepare_invoke();
        call.key(namespace.meta_key())
            .key(namespace.limits_key())
            .key(namespace.holders_key(None))
            .key(namespace.lease_key(lease_id));
        add_queue_keys(&mut call, namespace, key);
        for extra in extra_lease_ids {
            call.key(namespace.lease_key(extra));
        }
        call.arg(lease_id)
            .arg(holder)
            .arg(key.unwrap_or(""))
            .arg(token)
            .arg(millis(request.fallback_lease))
            .arg(HINT_CAP_MS)
            .arg(millis(request.waiter_ttl).max(1))
            .arg(namespace.wake_channel())
            .arg(request.followers);
        for extra in extra_lease_ids {
            call.arg(extra);
        }
        let reply: Value = call.invoke_async(con).await?;
        match parse_acquire(&reply) {
            Some(parsed) if parsed.extra_fences.len() <= extra_lease_ids.len() => Ok(parsed),
            _ => {
                // The script may have granted the leases before its reply
                // turned out unreadable: take them back rather than leave
                // them held until they expire.
                let ids =
                    std::iter::once(lease_id).chain(extra_lease_ids.iter().map(String::as_str));
                for id in ids {
                    let lease = LeaseRef { lease_id: id, key };
                    let _ = self.release(con, namespace, lease).await;
                }
                Err(unexpected("acquire", &reply))
            }
        }
    }

    /// Renews every lease in `leases` in one call, without an expected
    /// expiry; see [`renew_expecting`](Self::renew_expecting).
    pub async fn renew<C: ConnectionLike>(
        &self,
        con: &mut C,
        namespace: &Namespace,
        leases: &[LeaseRef<'_>],
        token: &str,
        fallback_lease: Duration,
    ) -> Result<RenewReply, redis::RedisError> {
        let leases: Vec<(LeaseRef<'_>, u64)> = leases.iter().map(|lease| (*lease, 0)).collect();
        self.renew_expecting(con, namespace, &leases, token, fallback_lease)
            .await
    }

    /// Renews every lease in `leases` in one call. Each lease comes with
    /// the expiry the caller last got for it, in server milliseconds (0 when
    /// unknown).
    ///
    /// The call takes it that Redis lost writes when a lease is missing from
    /// its set before that expiry without a release, or when another Redis
    /// server process stamped the meta hash. The call then starts a grace of one lease and
    /// a new epoch, and returns every lease as lost. With no leases it still
    /// checks the server.
    pub async fn renew_expecting<C: ConnectionLike>(
        &self,
        con: &mut C,
        namespace: &Namespace,
        leases: &[(LeaseRef<'_>, u64)],
        token: &str,
        fallback_lease: Duration,
    ) -> Result<RenewReply, redis::RedisError> {
        let mut call = self.renew.prepare_invoke();
        call.key(namespace.meta_key())
            .key(namespace.limits_key())
            .key(namespace.holders_key(None));
        call.arg(token).arg(millis(fallback_lease));
        for (lease, expected_expiry_ms) in leases {
            call.key(namespace.lease_key(lease.lease_id))
                .key(namespace.holders_key(lease.key));
            call.arg(lease.lease_id).arg(*expected_expiry_ms);
        }
        let reply: Value = call.invoke_async(con).await?;
        parse_renew(&reply, leases.len()).ok_or_else(|| unexpected("renew", &reply))
    }

    /// Removes a lease and, for each count that then has room, names its
    /// oldest live waiter on the wake channel. Returns the number of set
    /// members removed: 0 when the lease was already lost or released.
    pub async fn release<C: ConnectionLike>(
        &self,
        con: &mut C,
        namespace: &Namespace,
        lease: LeaseRef<'_>,
    ) -> Result<u64, redis::RedisError> {
        let mut call = self.release.prepare_invoke();
        call.key(namespace.limits_key())
            .key(namespace.holders_key(None))
            .key(namespace.lease_key(lease.lease_id));
        add_queue_keys(&mut call, namespace, lease.key);
        call.arg(lease.lease_id)
            .arg(namespace.wake_channel())
            .arg(lease.key.unwrap_or(""));
        let reply: Value = call.invoke_async(con).await?;
        int(&reply)
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| unexpected("release", &reply))
    }

    /// Writes one field of the limits hash (`value` `None` deletes it). A
    /// new value of `global` or `k:<key>` names as many waiters of that
    /// count as it has free places; any other change wakes every waiter.
    pub async fn set_limit<C: ConnectionLike>(
        &self,
        con: &mut C,
        namespace: &Namespace,
        field: &str,
        value: Option<u64>,
        token: &str,
        fallback_lease: Duration,
    ) -> Result<(), redis::RedisError> {
        let mut call = self.set_limit.prepare_invoke();
        call.key(namespace.meta_key()).key(namespace.limits_key());
        let count = match field {
            "global" => Some(None),
            _ => field.strip_prefix("k:").map(Some),
        };
        if let Some(key) = count {
            add_count_keys(&mut call, namespace, key);
        }
        call.arg(field)
            .arg(value.map(|v| v.to_string()).unwrap_or_default())
            .arg(namespace.wake_channel())
            .arg(token)
            .arg(millis(fallback_lease));
        let _: Value = call.invoke_async(con).await?;
        Ok(())
    }

    /// Writes `fields` into the limits hash only if the hash does not
    /// exist. Returns whether it wrote them.
    pub async fn restore_limits<C: ConnectionLike>(
        &self,
        con: &mut C,
        namespace: &Namespace,
        fields: &[(String, String)],
    ) -> Result<bool, redis::RedisError> {
        if fields.is_empty() {
            return Ok(false);
        }
        let mut call = self.restore_limits.prepare_invoke();
        call.key(namespace.limits_key());
        for (field, value) in fields {
            call.arg(field).arg(value);
        }
        let reply: Value = call.invoke_async(con).await?;
        int(&reply)
            .map(|n| n == 1)
            .ok_or_else(|| unexpected("restore_limits", &reply))
    }
}

fn add_waiter_keys(call: &mut redis::ScriptInvocation<'_>, keys: &WaiterKeys) {
    call.key(&keys.queue).key(&keys.expiry).key(&keys.named);
}

/// Adds the holder set and the waiter keys of one count (the global count
/// for `key` `None`).
fn add_count_keys(
    call: &mut redis::ScriptInvocation<'_>,
    namespace: &Namespace,
    key: Option<&str>,
) {
    call.key(namespace.holders_key(key));
    add_waiter_keys(call, &namespace.waiter_keys(key));
}

/// Adds the keys that ACQUIRE and RELEASE take after the lease hash: the
/// global waiter keys and, with `key`, the key's holder set and waiter keys.
fn add_queue_keys(
    call: &mut redis::ScriptInvocation<'_>,
    namespace: &Namespace,
    key: Option<&str>,
) {
    add_waiter_keys(call, &namespace.waiter_keys(None));
    if let Some(key) = key {
        add_count_keys(call, namespace, Some(key));
    }
}

pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn unexpected(script: &str, reply: &Value) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "unexpected script reply",
        format!("the {script} script returned {reply:?}"),
    ))
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(text) => text.parse().ok(),
        _ => None,
    }
}

fn uint(value: &Value) -> Option<u64> {
    u64::try_from(int(value)?).ok()
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn parse_acquire(reply: &Value) -> Option<AcquireOutcome> {
    let Value::Array(items) = reply else {
        return None;
    };
    let (status, value, epoch, lease, global, extra) = match items.get(..6)? {
        [status, value, epoch, lease, global, extra] => {
            (status, value, epoch, lease, global, extra)
        }
        _ => return None,
    };
    let (queued, fences) = match &items[6..] {
        [] => (None, None),
        [queued] => (Some(queued), None),
        [queued, fences] => (Some(queued), Some(fences)),
        _ => return None,
    };
    let queued_next = match queued.map(int).unwrap_or(Some(0))? {
        0 => None,
        1 => Some(QueuedCount::Global),
        2 => Some(QueuedCount::Key),
        _ => return None,
    };
    let extra_fences = match fences {
        None => Vec::new(),
        Some(Value::Array(fences)) => fences.iter().map(uint).collect::<Option<Vec<u64>>>()?,
        Some(_) => return None,
    };
    let lease = Duration::from_millis(uint(lease)?);
    let global_limit = uint(global);
    let reply = match int(status)? {
        0 => AcquireReply::Granted {
            fence: uint(value)?,
            expiry_ms: uint(extra)?,
            epoch: text(epoch)?,
            lease,
            global_limit: global_limit?,
        },
        1 => AcquireReply::Busy {
            retry_in: Duration::from_millis(uint(value)?),
            global_full: int(extra)? == 1,
            lease,
            global_limit: global_limit?,
        },
        2 => AcquireReply::Grace {
            wait: Duration::from_millis(uint(value)?),
            lease,
        },
        3 => AcquireReply::NoLimit,
        _ => return None,
    };
    Some(AcquireOutcome {
        reply,
        queued_next,
        extra_fences,
    })
}

fn parse_renew(reply: &Value, count: usize) -> Option<RenewReply> {
    let Value::Array(items) = reply else {
        return None;
    };
    if items.len() != count + 3 {
        return None;
    }
    let renewed = items[3..]
        .iter()
        .map(|item| int(item).map(|n| n == 1))
        .collect::<Option<Vec<bool>>>()?;
    Some(RenewReply {
        epoch: text(&items[0])?,
        lease: Duration::from_millis(uint(&items[1])?),
        expiry_ms: uint(&items[2])?,
        renewed,
    })
}

/// Field name in the limits hash of a key's own limit.
pub(crate) fn key_field(key: &str) -> String {
    format!("k:{key}")
}
