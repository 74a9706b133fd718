//! The atomic Redis operations of kombu's Redis transport, each one Lua script, so a message
//! is at every instant either in a queue's list or in `unacked`, never in neither and never
//! half-moved (kombu itself pops with BRPOP and records in a later MULTI; a worker killed in
//! between loses the message). What each does, and where it follows kombu
//! (`kombu/transport/redis.py`):
//!
//! - [`take`]: RPOP the first non-empty list and record it unacked (`QoS.append`).
//! - [`ack`]: forget it (`QoS.ack`, and `QoS.reject` without requeue).
//! - [`requeue`]: put it back, marked redelivered (`QoS.restore_by_tag` through
//!   `Channel._do_restore_message`).
//! - [`restore_expired`]: put back what was held past the visibility timeout
//!   (`QoS.restore_visible`), unless a kombu worker holds `unacked_mutex`.
//! - [`renew`]: move the lease of messages still being worked on.
//! - [`push`]: deliver a message (`Channel._put` after `_lookup`).
//!
//! Messages are moved as the text they came as: the scripts never re-encode a message (Redis's
//! cjson would turn `[]` into `{}` and round big numbers); the redelivered marks are spliced in.
//!
//! Routing for a named exchange reads its binding set as kombu's direct exchange does (same
//! routing key). kombu keeps exchange types in each process's memory, and a process that has
//! not declared an exchange treats it as direct too. The scripts compute some keys inside
//! (queues found through bindings), as kombu's own commands do: standalone Redis only, not
//! Redis Cluster.

use super::keys::{Keys, SEP};
use redis::aio::ConnectionManager;
use redis::Script;
use std::sync::LazyLock;

/// Lua shared by the scripts that route: binding lookup, priority steps, and the restore of
/// one unacked entry.
const PRELUDE: &str = r#"
local SEP = '\6\22'

-- kombu's _lookup with a direct exchange: "" routes to the queue named by the routing key;
-- any other exchange to the queues of its bindings (`rk SEP pattern SEP queue`) with `rk`.
local function lookup(binding_key, ex, rk)
  if ex == '' then
    if rk == '' then return {} end
    return {rk}
  end
  local queues, seen = {}, {}
  for _, member in ipairs(redis.call('SMEMBERS', binding_key)) do
    local a = string.find(member, SEP, 1, true)
    local b = a and string.find(member, SEP, a + 2, true)
    if b and not string.find(member, SEP, b + 2, true) then
      local q = string.sub(member, b + 2)
      if string.sub(member, 1, a - 1) == rk and q ~= '' and not seen[q] then
        seen[q] = true
        queues[#queues + 1] = q
      end
    end
  end
  return queues
end

local function parse_steps(csv)
  local steps = {}
  for s in string.gmatch(csv, '%d+') do steps[#steps + 1] = tonumber(s) end
  return steps
end

-- kombu's Channel.priority: the largest step not above p, else (bisect - 1 = -1) the last.
local function step_for(p, steps)
  local best = steps[#steps]
  for _, s in ipairs(steps) do if s <= p then best = s end end
  return best
end

local function list_key(prefix, q, step)
  if step == 0 then return prefix .. q end
  return prefix .. q .. SEP .. step
end

-- kombu's _get_message_priority: int(properties.priority) clamped to 0..9, else 0.
local function priority_of(msg)
  local props = msg['properties']
  if type(props) ~= 'table' then return 0 end
  local p, n = props['priority'], nil
  if type(p) == 'number' then n = p
  elseif type(p) == 'boolean' then n = p and 1 or 0
  elseif type(p) == 'string' then
    local digits = string.match(p, '^%s*([+-]?%d+)%s*$')
    n = digits and tonumber(digits)
  end
  if not n or n ~= n then return 0 end
  if n >= 0 then n = math.floor(n) else n = math.ceil(n) end
  if n > 9 then return 9 end
  if n < 0 then return 0 end
  return n
end

-- Where the containers of JSON text `s` whose path is in `wanted` open and close. A path is
-- '' for the top, then '.' .. key for an object's member, '.' .. n for an array's n-th item.
local function spans(s, wanted)
  local found, stack, pos = {}, {}, 1
  while true do
    local i = string.find(s, '[%[%]{}",]', pos)
    if not i then return found end
    local c = string.byte(s, i)
    local top = stack[#stack]
    if c == 34 then
      local j = i + 1
      while true do
        local k = string.find(s, '["\\]', j)
        if not k then return found end
        if string.byte(s, k) == 92 then j = k + 2 else j = k break end
      end
      if top and top.obj and top.want_key then
        top.key, top.want_key = string.sub(s, i + 1, j - 1), false
      end
      pos = j + 1
    elseif c == 123 or c == 91 then
      local path = ''
      if top and top.obj then path = top.path .. '.' .. (top.key or '')
      elseif top then path = top.path .. '.' .. top.index end
      stack[#stack + 1] = {path = path, obj = (c == 123), want_key = (c == 123), index = 1, open = i}
      pos = i + 1
    elseif c == 125 or c == 93 then
      stack[#stack] = nil
      if top and wanted[top.path] then found[top.path] = {open = top.open, close = i, obj = top.obj} end
      pos = i + 1
    else
      if top and top.obj then top.want_key, top.key = true, nil
      elseif top then top.index = top.index + 1 end
      pos = i + 1
    end
  end
end

-- The message of entry `[message, exchange, routing_key]` as its text, with kombu's restore
-- marks (headers.redelivered, properties.delivery_info.redelivered) added at the end of
-- those objects, where a JSON reader takes them over an earlier value.
local function marked_message(entry, msg)
  local found = spans(entry, {['.1'] = true, ['.1.headers'] = true, ['.1.properties.delivery_info'] = true})
  local whole = found['.1']
  if not whole or not whole.obj then return nil end
  local inserts, added = {}, 0
  local function mark(span, tbl)
    if span and span.obj and type(tbl) == 'table' and tbl['redelivered'] ~= true then
      local empty = string.find(string.sub(entry, span.open + 1, span.close - 1), '^%s*$')
      local text = empty and '"redelivered": true' or ', "redelivered": true'
      inserts[#inserts + 1] = {span.close, text}
      added = added + #text
    end
  end
  local props = msg['properties']
  mark(found['.1.headers'], msg['headers'])
  mark(found['.1.properties.delivery_info'], type(props) == 'table' and props['delivery_info'] or nil)
  table.sort(inserts, function(x, y) return x[1] > y[1] end)
  local text = entry
  for _, ins in ipairs(inserts) do
    text = string.sub(text, 1, ins[1] - 1) .. ins[2] .. string.sub(text, ins[1])
  end
  return string.sub(text, whole.open, whole.close + added)
end

-- Pushes an unacked entry's message back to its queues. Returns 'restored' and the number
-- of lists, or why not ('unreadable', 'unroutable'); the caller removes the entry only
-- when restored.
local function restore(entry, leftmost, prefix, steps)
  local ok, decoded = pcall(cjson.decode, entry)
  if not ok or type(decoded) ~= 'table' then return 'unreadable', 0 end
  local msg, ex, rk = decoded[1], decoded[2], decoded[3]
  if type(msg) ~= 'table' or type(ex) ~= 'string' or type(rk) ~= 'string' then
    return 'unreadable', 0
  end
  local text = marked_message(entry, msg)
  if not text then return 'unreadable', 0 end
  local queues = lookup(prefix .. '_kombu.binding.' .. ex, ex, rk)
  if #queues == 0 then return 'unroutable', 0 end
  local step = step_for(priority_of(msg), steps)
  for _, q in ipairs(queues) do
    redis.call(leftmost and 'LPUSH' or 'RPUSH', list_key(prefix, q, step), text)
  end
  return 'restored', #queues
end
"#;

/// KEYS: unacked, unacked_index, then the lists in order. ARGV: now, then each list's queue.
/// An entry that is not a kombu message is returned unrecorded (`cjson` under `pcall`).
const TAKE_LUA: &str = r#"
for i = 3, #KEYS do
  local payload = redis.call('RPOP', KEYS[i])
  if payload then
    local ok, msg = pcall(cjson.decode, payload)
    if not ok or type(msg) ~= 'table' then
      return {'unreadable', KEYS[i], payload, 'not a JSON object'}
    end
    local props = msg['properties']
    if type(props) ~= 'table' then
      return {'unreadable', KEYS[i], payload, 'no properties object'}
    end
    local tag = props['delivery_tag']
    if type(tag) ~= 'string' or tag == '' then
      return {'unreadable', KEYS[i], payload, 'no properties.delivery_tag string'}
    end
    local ex, rk = '', ARGV[i - 1]
    local info = props['delivery_info']
    if type(info) == 'table' and type(info['exchange']) == 'string'
        and type(info['routing_key']) == 'string' then
      ex, rk = info['exchange'], info['routing_key']
    end
    redis.call('ZADD', KEYS[2], ARGV[1], tag)
    redis.call('HSET', KEYS[1], tag, '[' .. payload .. ', ' .. cjson.encode(ex) .. ', ' .. cjson.encode(rk) .. ']')
    return {'taken', KEYS[i], payload, tag}
  end
end
return false
"#;

/// KEYS: unacked, unacked_index. ARGV: tag.
const ACK_LUA: &str = r#"
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('HDEL', KEYS[1], ARGV[1])
"#;

/// KEYS: unacked, unacked_index. ARGV: tag, leftmost (1/0), prefix, steps.
const REQUEUE_LUA: &str = r#"
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if not entry then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {'missing', 0}
end
local status, n = restore(entry, ARGV[2] == '1', ARGV[3], parse_steps(ARGV[4]))
if status == 'restored' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return {status, n}
"#;

/// KEYS: unacked, unacked_index, unacked_mutex. ARGV: ceiling score, prefix, steps, then the
/// tags held (skipped). Newest first, each RPUSHed, as kombu's ZREVRANGEBYSCORE loop does.
const RESTORE_EXPIRED_LUA: &str = r#"
if redis.call('EXISTS', KEYS[3]) == 1 then return {'locked', 0, {}} end
local held = {}
for i = 4, #ARGV do held[ARGV[i]] = true end
local steps = parse_steps(ARGV[3])
local restored, stuck = 0, {}
for _, tag in ipairs(redis.call('ZREVRANGEBYSCORE', KEYS[2], ARGV[1], 0)) do
  if not held[tag] then
    local entry = redis.call('HGET', KEYS[1], tag)
    if not entry then
      redis.call('ZREM', KEYS[2], tag)
    else
      local status = restore(entry, false, ARGV[2], steps)
      if status == 'restored' then
        redis.call('HDEL', KEYS[1], tag)
        redis.call('ZREM', KEYS[2], tag)
        restored = restored + 1
      else
        stuck[#stuck + 1] = tag
        stuck[#stuck + 1] = status
      end
    end
  end
end
return {'done', restored, stuck}
"#;

/// KEYS: unacked_index. ARGV: now, then tags.
const RENEW_LUA: &str = r#"
local renewed = 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[i])
    renewed = renewed + 1
  end
end
return renewed
"#;

/// KEYS: the exchange's binding set. ARGV: exchange, routing key, prefix, step, payload.
const PUSH_LUA: &str = r#"
local queues = lookup(KEYS[1], ARGV[1], ARGV[2])
for _, q in ipairs(queues) do
  redis.call('LPUSH', list_key(ARGV[3], q, tonumber(ARGV[4])), ARGV[5])
end
return #queues
"#;

static TAKE: LazyLock<Script> = LazyLock::new(|| Script::new(TAKE_LUA));
static ACK: LazyLock<Script> = LazyLock::new(|| Script::new(ACK_LUA));
static REQUEUE: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{PRELUDE}{REQUEUE_LUA}")));
static RESTORE_EXPIRED: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{PRELUDE}{RESTORE_EXPIRED_LUA}")));
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW_LUA));
static PUSH: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{PRELUDE}{PUSH_LUA}")));

/// Why an operation did not complete. Each is one script, so it happened entirely or not at
/// all; when the connection broke mid-reply it is unknown which (a [`take`] then leaves the
/// message in `unacked`, where [`restore_expired`] finds it).
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("Redis `{op}` failed: {source}; check the broker connection (the operation is atomic: done whole or not at all)")]
    Redis {
        op: &'static str,
        source: redis::RedisError,
    },
    #[error(
        "Redis answered `{op}` with {detail}; is this a Redis server with Lua scripting (EVAL)?"
    )]
    Reply { op: &'static str, detail: String },
}

fn failed(op: &'static str) -> impl FnOnce(redis::RedisError) -> OpError {
    move |source| OpError::Redis { op, source }
}

/// A message popped by [`take`].
#[derive(Debug, Clone, PartialEq)]
pub enum Taken {
    /// Recorded in `unacked` under `tag`: [`ack`], [`requeue`] or [`renew`] it by that tag.
    Message {
        queue: String,
        list: String,
        payload: Vec<u8>,
        tag: String,
    },
    /// Popped but not recorded, since it is not a kombu message (`reason`); kombu would fail
    /// to read it as well. The caller logs it and drops it.
    Unreadable {
        queue: String,
        list: String,
        payload: Vec<u8>,
        reason: String,
    },
}

impl Taken {
    /// The queue it came from (for [`super::keys::QueueCycle::rotate`]).
    pub fn queue(&self) -> &str {
        match self {
            Taken::Message { queue, .. } | Taken::Unreadable { queue, .. } => queue,
        }
    }
}

/// Pops the first non-empty list of `order` (see [`Keys::watch_order`]) from the consumer end
/// (RPOP) and, in the same script, records it unacked as kombu's `QoS.append` does: `HSET
/// unacked <tag> [message, exchange, routing_key]`, `ZADD unacked_index <now> <tag>`. A
/// message without `delivery_info` is recorded as published to its queue (exchange "",
/// routing key = queue), so a restore finds its way back. `now`: seconds since the epoch.
pub async fn take(
    conn: &mut ConnectionManager,
    keys: &Keys,
    order: &[String],
    now: f64,
) -> Result<Option<Taken>, OpError> {
    if order.is_empty() {
        return Ok(None);
    }
    let mut call = TAKE.prepare_invoke();
    call.key(keys.unacked()).key(keys.unacked_index()).arg(now);
    for list in order {
        call.key(list).arg(keys.queue_of(list).unwrap_or(list));
    }
    let reply: Option<(String, String, Vec<u8>, String)> =
        call.invoke_async(conn).await.map_err(failed("take"))?;
    let Some((status, list, payload, detail)) = reply else {
        return Ok(None);
    };
    let queue = keys.queue_of(&list).unwrap_or(&list).to_string();
    match status.as_str() {
        "taken" => Ok(Some(Taken::Message {
            queue,
            list,
            payload,
            tag: detail,
        })),
        "unreadable" => Ok(Some(Taken::Unreadable {
            queue,
            list,
            payload,
            reason: detail,
        })),
        other => Err(OpError::Reply {
            op: "take",
            detail: format!("status `{other}`"),
        }),
    }
}

/// Forgets an unacked message (ack, or reject without requeue): `ZREM` + `HDEL`. Whether it
/// was there.
pub async fn ack(conn: &mut ConnectionManager, keys: &Keys, tag: &str) -> Result<bool, OpError> {
    let removed: i64 = ACK
        .key(keys.unacked())
        .key(keys.unacked_index())
        .arg(tag)
        .invoke_async(conn)
        .await
        .map_err(failed("ack"))?;
    Ok(removed > 0)
}

/// Which end of its list a requeued message goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// LPUSH, behind everything waiting: kombu's `basic_reject(requeue=True)` (`leftmost`).
    Back,
    /// RPUSH, taken next: kombu's restore at shutdown (`restore_unacked`) and after the
    /// visibility timeout.
    Front,
}

/// Why an unacked entry was left where it is rather than restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stuck {
    /// Its exchange has no binding with its routing key (kombu would drop it).
    Unroutable,
    /// Not a `[message, exchange, routing_key]` entry kombu could read.
    Unreadable,
}

/// What [`requeue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeued {
    /// Back in `lists` lists (one per matching binding), marked redelivered.
    Restored { lists: usize },
    /// Not unacked (acked, or restored by someone else, already).
    Missing,
    /// Left in `unacked` untouched, for the caller to log; never silently dropped.
    Stuck(Stuck),
}

fn stuck(status: &str, op: &'static str) -> Result<Stuck, OpError> {
    match status {
        "unroutable" => Ok(Stuck::Unroutable),
        "unreadable" => Ok(Stuck::Unreadable),
        other => Err(OpError::Reply {
            op,
            detail: format!("status `{other}`"),
        }),
    }
}

/// Puts unacked message `tag` back on its queues and forgets it, atomically: the message is
/// marked redelivered (`headers.redelivered`, `properties.delivery_info.redelivered`), routed
/// by its recorded exchange and routing key, and pushed to the list of its priority's step.
pub async fn requeue(
    conn: &mut ConnectionManager,
    keys: &Keys,
    tag: &str,
    placement: Placement,
) -> Result<Requeued, OpError> {
    let (status, lists): (String, usize) = REQUEUE
        .key(keys.unacked())
        .key(keys.unacked_index())
        .arg(tag)
        .arg(i32::from(placement == Placement::Back))
        .arg(keys.global_keyprefix())
        .arg(steps_arg(keys))
        .invoke_async(conn)
        .await
        .map_err(failed("requeue"))?;
    match status.as_str() {
        "restored" => Ok(Requeued::Restored { lists }),
        "missing" => Ok(Requeued::Missing),
        other => stuck(other, "requeue").map(Requeued::Stuck),
    }
}

fn steps_arg(keys: &Keys) -> String {
    let steps: Vec<String> = keys.priority_steps().iter().map(u8::to_string).collect();
    steps.join(",")
}

/// What one [`restore_expired`] round did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RestoreRound {
    /// A kombu worker held `unacked_mutex`: nothing was looked at this round.
    pub mutex_held: bool,
    pub restored: usize,
    /// Expired entries left in `unacked`, with why (log them; they are tried every round).
    pub stuck: Vec<(String, Stuck)>,
}

/// Restores every unacked message delivered longer than `visibility_timeout_secs` before
/// `now` (score in `[0, now - timeout]`, as kombu's `restore_visible`) to the front of its
/// queue, except the tags in `held` (ours, still running). Does nothing while a kombu worker
/// holds `unacked_mutex` (its restore runs outside a transaction). We only check that lock and
/// never take it: the script is atomic, so nobody could observe us mid-restore anyway, and a
/// lock taken and released inside one script is invisible to everyone.
pub async fn restore_expired(
    conn: &mut ConnectionManager,
    keys: &Keys,
    visibility_timeout_secs: f64,
    now: f64,
    held: &[String],
) -> Result<RestoreRound, OpError> {
    let mut call = RESTORE_EXPIRED.prepare_invoke();
    call.key(keys.unacked())
        .key(keys.unacked_index())
        .key(keys.unacked_mutex())
        .arg(now - visibility_timeout_secs)
        .arg(keys.global_keyprefix())
        .arg(steps_arg(keys));
    for tag in held {
        call.arg(tag);
    }
    let (status, restored, pairs): (String, usize, Vec<String>) = call
        .invoke_async(conn)
        .await
        .map_err(failed("restore_expired"))?;
    if status == "locked" {
        return Ok(RestoreRound {
            mutex_held: true,
            ..RestoreRound::default()
        });
    }
    let stuck = pairs
        .chunks(2)
        .map(|pair| match pair {
            [tag, why] => Ok((tag.clone(), stuck(why, "restore_expired")?)),
            _ => Err(OpError::Reply {
                op: "restore_expired",
                detail: "an odd list of stuck entries".into(),
            }),
        })
        .collect::<Result<_, _>>()?;
    Ok(RestoreRound {
        mutex_held: false,
        restored,
        stuck,
    })
}

/// Moves the lease of `tags` (messages still being worked on) to `now`, so no restore takes
/// them (`ZADD unacked_index XX`: an acked tag is never re-added). How many were still there.
pub async fn renew(
    conn: &mut ConnectionManager,
    keys: &Keys,
    tags: &[String],
    now: f64,
) -> Result<usize, OpError> {
    if tags.is_empty() {
        return Ok(0);
    }
    let mut call = RENEW.prepare_invoke();
    call.key(keys.unacked_index()).arg(now);
    for tag in tags {
        call.arg(tag);
    }
    call.invoke_async(conn).await.map_err(failed("renew"))
}

/// Delivers `payload` (an [`super::envelope::encode`]d message) as kombu's `_put` does: with
/// the default exchange "" to the queue named `routing_key`, otherwise to every queue bound to
/// `exchange` with `routing_key`; LPUSHed to the list of `priority`'s step. The number of
/// queues it went to: 0 means nothing is bound (kombu drops it too; the caller decides).
pub async fn push(
    conn: &mut ConnectionManager,
    keys: &Keys,
    exchange: &str,
    routing_key: &str,
    priority: u8,
    payload: &[u8],
) -> Result<usize, OpError> {
    let step = keys.step_for(priority.min(super::keys::MAX_PRIORITY));
    PUSH.key(keys.binding(exchange))
        .arg(exchange)
        .arg(routing_key)
        .arg(keys.global_keyprefix())
        .arg(u32::from(step))
        .arg(payload)
        .invoke_async(conn)
        .await
        .map_err(failed("push"))
}

// `SEP` is spelled `'\6\22'` in the Lua above.
const _: () = assert!(SEP.len() == 2 && SEP.as_bytes()[0] == 6 && SEP.as_bytes()[1] == 22);
