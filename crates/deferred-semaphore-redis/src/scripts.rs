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

/// A validated namespace name and the Redis key names derived from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    name: String,
}

impl Namespace {
    /// Checks `name`: it must be non-empty and contain no `{`, `}` or
    /// whitespace, because it becomes the hash tag `{NAME}` of every key.
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

    /// The namespace as given.
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

    /// `dsr:{NAME}:wake`: the channel that carries the key whose capacity
    /// grew, or an empty message when every waiter should retry.
    pub fn wake_channel(&self) -> String {
        format!("dsr:{{{}}}:wake", self.name)
    }
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
-- lease, so that every holder from before the loss has stopped.
local function load_meta(meta_key, now, now_us, lease, token)
  local m = redis.call('HMGET', meta_key, 'epoch', 'grace_until', 'fence')
  if m[1] then
    return m[1], tonumber(m[2]) or 0, tonumber(m[3]) or 0, false
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
"#;

/// KEYS: meta, limits, global set, lease hash, [key set].
/// ARGV: lease id, holder, key or '', token, fallback lease ms, hint cap ms.
///
/// NOTE: this script does not compare the server's run id, because `INFO`
/// costs about as much as the whole script. After a restart from an older
/// snapshot it grants beside the vanished leases until the first renew call
/// of any client starts the grace, and those grants are then lost too.
/// Returns {status, value, epoch, lease_ms, global limit or -1, extra}:
/// status 0 granted (value = fence, extra = expiry), 1 busy (value = retry
/// hint ms, extra = 1 when the global count is full), 2 grace (value = wait
/// ms), 3 no global limit.
const ACQUIRE: &str = r#"
local now, now_us = server_now()
local lease = lease_of(KEYS[2], tonumber(ARGV[5]))
local epoch, grace_until, fence = load_meta(KEYS[1], now, now_us, lease, ARGV[4])
local global = tonumber(redis.call('HGET', KEYS[2], 'global'))
if not global then
  return {3, 0, epoch, lease, -1, 0}
end
if now < grace_until then
  return {2, grace_until - now, epoch, lease, global, 0}
end
local cap = tonumber(ARGV[6])
local hint = cap
local function has_room(set, limit)
  redis.call('ZREMRANGEBYSCORE', set, '-inf', now)
  if not limit then return true end
  if redis.call('ZCARD', set) < limit then return true end
  local first = redis.call('ZRANGE', set, 0, 0, 'WITHSCORES')
  if first[2] and tonumber(first[2]) - now < hint then
    hint = tonumber(first[2]) - now
  end
  return false
end
local global_room = has_room(KEYS[3], global)
local key_room = true
if KEYS[5] then
  local limit = tonumber(redis.call('HGET', KEYS[2], 'k:' .. ARGV[3]))
  if not limit then limit = tonumber(redis.call('HGET', KEYS[2], 'default')) end
  key_room = has_room(KEYS[5], limit)
end
if not (global_room and key_room) then
  if hint < 1 then hint = 1 end
  local global_full = 0
  if not global_room then global_full = 1 end
  return {1, hint, epoch, lease, global, global_full}
end
local new_fence = math.max(fence + 1, now_us)
redis.call('HSET', KEYS[1], 'fence', int(new_fence))
local expiry = now + lease
redis.call('ZADD', KEYS[3], expiry, ARGV[1])
extend_ttl(KEYS[3], lease + 1000)
if KEYS[5] then
  redis.call('ZADD', KEYS[5], expiry, ARGV[1])
  extend_ttl(KEYS[5], lease + 1000)
end
redis.call('HSET', KEYS[4], 'holder', ARGV[2], 'fence', int(new_fence), 'acquired_at', int(now), 'key', ARGV[3])
redis.call('PEXPIRE', KEYS[4], lease)
return {0, new_fence, epoch, lease, global, expiry}
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
local epoch, grace_until, _, created = load_meta(KEYS[1], now, now_us, lease, ARGV[1])
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

/// KEYS: global set, lease hash, [key set]. ARGV: lease id, wake channel,
/// key or ''. Returns the number of set members removed and publishes a
/// wake-up when it is not zero.
///
/// The lease hash stays until its own expiry, marked `released`, so that a
/// renewal sent before the release does not take the missing member for
/// lost data.
const RELEASE: &str = r#"
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
if KEYS[3] then
  removed = removed + redis.call('ZREM', KEYS[3], ARGV[1])
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'released', 1)
end
if removed > 0 then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return removed
"#;

/// KEYS: meta, limits. ARGV: field, value or '' to delete, wake channel,
/// token, fallback lease ms. Writes one limit, creates a missing meta hash
/// (which starts a grace) and wakes every waiter. Returns 1.
const SET_LIMIT: &str = r#"
local now, now_us = server_now()
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
local lease = lease_of(KEYS[2], tonumber(ARGV[5]))
load_meta(KEYS[1], now, now_us, lease, ARGV[4])
redis.call('PUBLISH', ARGV[3], '')
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
    /// A requested set is full; nothing was taken.
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
    /// The namespace's state was lost or is new: nothing is granted until
    /// one lease has passed.
    Grace {
        /// The time left in the grace.
        wait: Duration,
        /// The namespace's lease.
        lease: Duration,
    },
    /// No global limit is stored.
    NoLimit,
}

/// The reply of [`Scripts::renew`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewReply {
    /// The namespace epoch; a change means every older lease is lost.
    pub epoch: String,
    /// The namespace's lease.
    pub lease: Duration,
    /// The new expiry of every renewed lease, in server milliseconds since
    /// the epoch.
    pub expiry_ms: u64,
    /// Per lease in request order: `true` when renewed, `false` when lost.
    pub renewed: Vec<bool>,
}

/// One lease of a [`Scripts::renew`] call.
#[derive(Debug, Clone, Copy)]
pub struct LeaseRef<'a> {
    /// The lease id.
    pub lease_id: &'a str,
    /// The key of a keyed lease.
    pub key: Option<&'a str>,
}

/// The loaded scripts of the limiter. `redis::Script` sends `EVALSHA` and
/// loads a script again when the server replies `NOSCRIPT`, as after a
/// restart.
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
    /// Prepares every script (computes their hashes; nothing is sent).
    pub fn new() -> Self {
        let with_prologue = |body: &str| Script::new(&format!("{PROLOGUE}\n{body}"));
        Self {
            acquire: with_prologue(ACQUIRE),
            renew: with_prologue(RENEW),
            release: Script::new(RELEASE),
            set_limit: with_prologue(SET_LIMIT),
            restore_limits: Script::new(RESTORE_LIMITS),
        }
    }

    /// Tries once to add `lease_id` to the global set and, with `key`, to
    /// the key's set, all or nothing.
    ///
    /// `token` goes into a new epoch if the namespace state must be
    /// recreated. `fallback_lease` is the length of that grace when the
    /// limits hash is gone too (zero means 30 s).
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
        let mut call = self.acquire.prepare_invoke();
        call.key(namespace.meta_key())
            .key(namespace.limits_key())
            .key(namespace.holders_key(None))
            .key(namespace.lease_key(lease_id));
        if let Some(key) = key {
            call.key(namespace.holders_key(Some(key)));
        }
        call.arg(lease_id)
            .arg(holder)
            .arg(key.unwrap_or(""))
            .arg(token)
            .arg(millis(fallback_lease))
            .arg(HINT_CAP_MS);
        let reply: Value = call.invoke_async(con).await?;
        match parse_acquire(&reply) {
            Some(parsed) => Ok(parsed),
            None => {
                // The script may have granted the lease before its reply
                // turned out unreadable: take it back rather than leave it
                // held until it expires.
                let lease = LeaseRef { lease_id, key };
                let _ = self.release(con, namespace, lease).await;
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
    /// Redis lost writes when a lease is missing from its set before that
    /// expiry without a release, or when another Redis server process
    /// stamped the meta hash. The call then starts a grace of one lease and
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

    /// Removes a lease and wakes waiters when it was still held. Returns
    /// the number of set members removed: 0 when the lease was already
    /// lost or released.
    pub async fn release<C: ConnectionLike>(
        &self,
        con: &mut C,
        namespace: &Namespace,
        lease: LeaseRef<'_>,
    ) -> Result<u64, redis::RedisError> {
        let mut call = self.release.prepare_invoke();
        call.key(namespace.holders_key(None))
            .key(namespace.lease_key(lease.lease_id));
        if let Some(key) = lease.key {
            call.key(namespace.holders_key(Some(key)));
        }
        call.arg(lease.lease_id)
            .arg(namespace.wake_channel())
            .arg(lease.key.unwrap_or(""));
        let reply: Value = call.invoke_async(con).await?;
        int(&reply)
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| unexpected("release", &reply))
    }

    /// Writes one field of the limits hash (`value` `None` deletes it) and
    /// wakes every waiter.
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

fn parse_acquire(reply: &Value) -> Option<AcquireReply> {
    let Value::Array(items) = reply else {
        return None;
    };
    let [status, value, epoch, lease, global, extra] = items.as_slice() else {
        return None;
    };
    let lease = Duration::from_millis(uint(lease)?);
    let global_limit = uint(global);
    Some(match int(status)? {
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
