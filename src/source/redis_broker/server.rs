//! Where the Redis server is: one URL (`redis://`, `rediss://` for TLS), or, as Celery spells
//! Sentinel, a list of `sentinel://host:26379` URLs and the master's name, asked of the
//! sentinels again after each failure so a failover is followed.

use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ConnectionAddr, IntoConnectionInfo};

/// The Redis server the broker is, and how to reach it.
pub(super) enum Server {
    Direct(redis::Client),
    Sentinel {
        sentinels: tokio::sync::Mutex<SentinelClient>,
        db: i64,
    },
}

/// The `redis://` form of a `sentinel://` URL, which the crate parses.
fn as_redis_url(url: &str) -> String {
    match url.strip_prefix("sentinel://") {
        Some(rest) => format!("redis://{rest}"),
        None => url.to_string(),
    }
}

/// Checks a broker URL (one of a Sentinel list) as the config is read.
pub(super) fn check_url(url: &str) -> Result<(), String> {
    let redacted = crate::source::redact(url);
    as_redis_url(url)
        .as_str()
        .into_connection_info()
        .map(|_| ())
        .map_err(|e| {
            format!("`{redacted}` is not a Redis URL ({e}); use redis://[:password@]host:6379/0, rediss://... for TLS, or sentinel://host:26379;sentinel://... with `master_name`")
        })
}

impl Server {
    /// `urls`: one `redis://`/`rediss://` URL, or the `sentinel://` list (the first one's
    /// password and database are the master's, as kombu takes them).
    pub(super) fn open(
        urls: &[&str],
        tls: &redis::TlsCertificates,
        master_name: Option<&str>,
    ) -> Result<Server, String> {
        let first = urls.first().copied().unwrap_or_default();
        if !first.starts_with("sentinel://") {
            let client = match first.starts_with("rediss://") {
                true => {
                    // Both of rustls's providers are linked (lapin, reqwest): name the one.
                    let _ = rustls::crypto::ring::default_provider().install_default();
                    redis::Client::build_with_tls(first, tls.clone())
                }
                false => redis::Client::open(first),
            };
            return client.map(Server::Direct).map_err(|e| e.to_string());
        }
        let Some(master) = master_name else {
            return Err("a sentinel:// broker needs `master_name` (Celery's broker_transport_options['master_name'])".into());
        };
        let infos = urls
            .iter()
            .map(|u| as_redis_url(u).as_str().into_connection_info())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let master_info = infos[0].redis_settings();
        let addrs: Vec<ConnectionAddr> = infos.iter().map(|i| i.addr().clone()).collect();
        let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
            .map_err(|e| e.to_string())?
            .set_client_to_redis_db(master_info.db());
        if let Some(password) = master_info.password() {
            builder = builder.set_client_to_redis_password(password);
        }
        if let Some(user) = master_info.username() {
            builder = builder.set_client_to_redis_username(user);
        }
        let db = master_info.db();
        let sentinels = builder.build().map_err(|e| e.to_string())?;
        Ok(Server::Sentinel {
            sentinels: tokio::sync::Mutex::new(sentinels),
            db,
        })
    }

    /// The database the broker's keys are in (the fanout channels name it).
    pub(super) fn db(&self) -> i64 {
        match self {
            Server::Direct(client) => client.get_connection_info().redis_settings().db(),
            Server::Sentinel { db, .. } => *db,
        }
    }

    /// A client of the server now (the master the sentinels name now, for Sentinel).
    pub(super) async fn client(&self) -> redis::RedisResult<redis::Client> {
        match self {
            Server::Direct(client) => Ok(client.clone()),
            Server::Sentinel { sentinels, .. } => sentinels.lock().await.async_get_client().await,
        }
    }

    /// Whether a failed connection should be made anew (asking the sentinels again) rather
    /// than left to reconnect to the same address.
    pub(super) fn follows_failover(&self) -> bool {
        matches!(self, Server::Sentinel { .. })
    }
}
