//! Celery's Redis result backend (`result_backend = "redis://host:6379/0"`), written as
//! Celery's `RedisBackend` writes it, so a client configured with `backend="redis://..."` reads
//! results, failures and custom states (`PROGRESS`, `STREAM`) through `AsyncResult.state`,
//! `.info`, `.get()` and `get(on_message=...)`:
//!
//! - a state is the JSON meta under `celery-task-meta-<id>`, set with the `result_expires` TTL
//!   and `PUBLISH`ed on the channel of the same name in one `MULTI`; a stored `SUCCESS` is
//!   never overwritten;
//! - a final state is retried with backoff while Redis is away, until stored (the task's
//!   message stays unacked meanwhile), so an outage delays results and loses none.

use super::redact;
use redis::aio::ConnectionManager;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// First wait before storing a final state again after Redis failed; it doubles up to the max.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// The key (and pub/sub channel) of a task's state.
pub fn task_key(task_id: &str) -> String {
    format!("celery-task-meta-{task_id}")
}

/// A Redis result backend: one auto-reconnecting connection, made on first use.
pub struct RedisBackend {
    client: redis::Client,
    url: String,
    /// `result_expires`: the TTL of stored states; `None` keeps them.
    expires: Option<u64>,
    connection: Mutex<Option<ConnectionManager>>,
}

impl RedisBackend {
    /// Checks the URL; connects on first use.
    pub fn new(url: &str, expires: Option<u64>) -> Result<RedisBackend, String> {
        let client = redis::Client::open(url).map_err(|e| {
            format!(
                "key `result_backend`: `{}` is not a Redis URL ({e}); use redis://host:6379/0",
                redact(url)
            )
        })?;
        Ok(RedisBackend {
            client,
            url: redact(url),
            expires: expires.filter(|s| *s > 0),
            connection: Mutex::new(None),
        })
    }

    /// The URL without its password, for logs.
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = ConnectionManager::new(self.client.clone()).await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Stores `meta` (JSON) as task `task_id`'s state and publishes it, unless a `SUCCESS` is
    /// stored already (then nothing changes, as in Celery).
    pub async fn store(&self, task_id: &str, meta: &str) -> redis::RedisResult<()> {
        let mut c = self.connection().await?;
        let key = task_key(task_id);
        let stored: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut c).await?;
        if stored.is_some_and(|s| is_success(&s)) {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        match self.expires {
            Some(ttl) => pipe.cmd("SETEX").arg(&key).arg(ttl).arg(meta).ignore(),
            None => pipe.cmd("SET").arg(&key).arg(meta).ignore(),
        };
        pipe.cmd("PUBLISH").arg(&key).arg(meta).ignore();
        pipe.query_async::<()>(&mut c).await
    }

    /// Stores a final state, retrying with backoff while Redis fails, until it is stored
    /// (true) or `stop` fires first (false: the caller leaves the task's message unacked).
    pub async fn store_final(&self, task_id: &str, meta: &str, stop: &CancellationToken) -> bool {
        let mut wait = RETRY_MIN;
        let mut failures = 0u32;
        loop {
            match self.store(task_id, meta).await {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(task_id, backend = %self.url, "result stored after {failures} failed attempt(s)");
                    }
                    return true;
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(task_id, backend = %self.url, "cannot store the result in Redis ({e}); retrying in {wait:?} (attempt {failures}); the task's message stays unacked until it is stored");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return false,
            }
            wait = (wait * 2).min(RETRY_MAX);
        }
    }
}

/// One chord header task's part, counted as Celery 5.7's `on_chord_part_return` counts it
/// (keys `celery-taskset-meta-<gid>` + `.j .t .s .d` and `.c`): added once per `tid:index`,
/// and when the parts reach the size the client set, one worker claims the body.
const CHORD_PART_LUA: &str = r"
if redis.call('GET', KEYS[6]) == 'done' then return {-1, 0, -1, 0} end
local member = ARGV[1] .. ':' .. ARGV[3]
if redis.call('SISMEMBER', KEYS[4], member) == 0 then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
  redis.call('SADD', KEYS[4], member)
end
local ready = redis.call('ZCOUNT', KEYS[1], '-inf', '+inf')
local expires = tonumber(ARGV[4])
if expires > 0 then
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], expires) end
  redis.call('EXPIRE', KEYS[5], expires)
end
local totaldiff = tonumber(redis.call('GET', KEYS[2]) or '0')
local size = redis.call('GET', KEYS[3])
local claimed = 0
if size and ready == tonumber(size) + totaldiff then
  if redis.call('SET', KEYS[6], ARGV[6], 'NX', 'EX', ARGV[5]) then claimed = 1 end
end
return {ready, totaldiff, size and tonumber(size) or -1, claimed}
";

/// After the body went out: the chord's counting keys are dropped and it is marked done.
const CHORD_CLEANUP_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
  redis.call('SET', KEYS[1], 'done', 'EX', ARGV[2])
  return 1
end
return 0
";

/// How long a claim on a chord's body holds (Celery's 6 s, then extended while publishing).
const CHORD_CLAIM_SECS: u64 = 30;

impl RedisBackend {
    fn chord_keys(group_id: &str) -> [String; 6] {
        let p = format!("celery-taskset-meta-{group_id}");
        [
            format!("{p}.j"),
            format!("{p}.t"),
            format!("{p}.s"),
            format!("{p}.d"),
            p.clone(),
            format!("{p}.c"),
        ]
    }

    /// Adds a header task's part (`[1, tid, state, result]`, JSON) to its chord. `Some(token)`
    /// when this was the last part and this worker claimed the body (it then sends it and
    /// calls `chord_done` with the token).
    pub async fn chord_part(
        &self,
        group_id: &str,
        task_id: &str,
        part: &str,
        index: Option<u64>,
    ) -> redis::RedisResult<Option<String>> {
        let mut c = self.connection().await?;
        let token = uuid::Uuid::new_v4().simple().to_string();
        let score = index
            .map(|i| i.to_string())
            .unwrap_or_else(|| "+inf".into());
        let lua = redis::Script::new(CHORD_PART_LUA);
        let mut script = lua.prepare_invoke();
        for key in Self::chord_keys(group_id) {
            script.key(key);
        }
        script
            .arg(task_id)
            .arg(part)
            .arg(score)
            .arg(self.expires.unwrap_or(0))
            .arg(CHORD_CLAIM_SECS)
            .arg(&token);
        let [ready, _, size, claimed]: [i64; 4] = script.invoke_async(&mut c).await?;
        tracing::debug!(group_id, ready, size, claimed, "chord part counted");
        Ok((claimed == 1).then_some(token))
    }

    /// Before a chord's header goes out: its size, and no claim left from before (Celery's
    /// client does `DEL <group>.c` and `SET <group>.s <n> EX <expires>`).
    pub async fn open_chord(&self, group_id: &str, size: usize) -> redis::RedisResult<()> {
        let mut c = self.connection().await?;
        let [_, _, s, _, _, claim] = Self::chord_keys(group_id);
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("DEL").arg(&claim).ignore();
        match self.expires {
            Some(ttl) => pipe
                .cmd("SET")
                .arg(&s)
                .arg(size)
                .arg("EX")
                .arg(ttl)
                .ignore(),
            None => pipe.cmd("SET").arg(&s).arg(size).ignore(),
        };
        pipe.query_async::<()>(&mut c).await
    }

    /// The parts of a chord, in header order (`[1, tid, state, result]` each).
    pub async fn chord_parts(&self, group_id: &str) -> redis::RedisResult<Vec<String>> {
        let mut c = self.connection().await?;
        let [j, ..] = Self::chord_keys(group_id);
        redis::cmd("ZRANGE")
            .arg(j)
            .arg(0)
            .arg(-1)
            .query_async(&mut c)
            .await
    }

    /// The body went out (or failed): the counting keys go, the chord is marked done.
    pub async fn chord_done(&self, group_id: &str, token: &str) -> redis::RedisResult<()> {
        let mut c = self.connection().await?;
        let [j, t, s, d, _, claim] = Self::chord_keys(group_id);
        redis::Script::new(CHORD_CLEANUP_LUA)
            .key(claim)
            .key(j)
            .key(t)
            .key(s)
            .key(d)
            .arg(token)
            .arg(300)
            .invoke_async::<i64>(&mut c)
            .await
            .map(drop)
    }
}

fn is_success(meta: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(meta).is_ok_and(|v| v["status"] == "SUCCESS")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_redacted() {
        assert!(RedisBackend::new("redis://127.0.0.1:6379/0", Some(86400)).is_ok());
        let e = RedisBackend::new("nonsense", None).err().unwrap();
        assert!(e.contains("key `result_backend`"), "{e}");
        let b = RedisBackend::new("redis://:pw@127.0.0.1:6379/1", None).unwrap();
        assert_eq!(b.url(), "redis://127.0.0.1:6379/1");
        assert_eq!(task_key("abc"), "celery-task-meta-abc");
        assert!(is_success(r#"{"status": "SUCCESS"}"#) && !is_success(r#"{"status": "PROGRESS"}"#));
    }
}
