//! TLS to the broker (`amqps://`), with rustls: the server is verified against the system's
//! roots plus `broker_ca`; `broker_cert` + `broker_key` authenticate this worker; and
//! `broker_tls_server_name` is the name the certificate must carry when it is not the URL's host
//! (say, the broker is reached by IP). The files are read once, at start, so a missing one stops
//! `serve` with its path rather than failing every reconnect.

use super::frame_guard::{FrameGuard, GuardedReactor};
use lapin::tcp::{AsyncTcpStream, OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};
use std::path::{Path, PathBuf};

/// The TLS settings of `worker.toml` (named like Celery's `broker_use_ssl` keys where they
/// overlap: `ca_certs`, `certfile`, `keyfile`, `server_hostname`).
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub server_name: Option<String>,
}

/// What a connection needs: the certificates read from the settings' files.
#[derive(Debug, Clone, Default)]
pub struct BrokerTls {
    config: OwnedTLSConfig,
    server_name: Option<String>,
}

fn read(setting: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| {
        format!(
            "cannot read `{setting}` {}: {e}; point it at a readable PEM file",
            path.display()
        )
    })
}

impl BrokerTls {
    /// Reads the files the settings name; an error names the setting and the path.
    pub fn load(settings: &TlsSettings) -> Result<BrokerTls, String> {
        let cert_chain = match &settings.ca {
            Some(path) => Some(
                String::from_utf8(read("broker_ca", path)?)
                    .map_err(|_| format!("`broker_ca` {} is not PEM text", path.display()))?,
            ),
            None => None,
        };
        let identity = match (&settings.cert, &settings.key) {
            (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
                pem: read("broker_cert", cert)?,
                key: read("broker_key", key)?,
            }),
            (None, None) => None,
            _ => {
                return Err(
                    "`broker_cert` and `broker_key` go together: set both (a client certificate and its key) or neither"
                        .into(),
                )
            }
        };
        Ok(BrokerTls {
            config: OwnedTLSConfig {
                identity,
                cert_chain,
            },
            server_name: settings.server_name.clone().filter(|n| !n.is_empty()),
        })
    }

    /// `broker_ca`'s PEM text, if set.
    pub fn ca_pem(&self) -> Option<&str> {
        self.config.cert_chain.as_deref()
    }

    /// `broker_cert` and `broker_key`, PEM, if set.
    pub fn client_pem(&self) -> Option<(&[u8], &[u8])> {
        match &self.config.identity {
            Some(OwnedIdentity::PKCS8 { pem, key }) => Some((pem, key)),
            _ => None,
        }
    }

    /// Connects to `url`: plain for `amqp://`, TLS for `amqps://`.
    pub async fn connect(
        &self,
        url: &str,
        props: ConnectionProperties,
    ) -> Result<Connection, lapin::Error> {
        let uri: AMQPUri = url.parse().map_err(|e: String| {
            lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("not an AMQP URL ({e})"),
            ))
        })?;
        // Every connection's stream is vetted before lapin parses it (see `frame_guard`).
        let runtime = async_rs::Runtime::new(async_rs::util::RuntimeParts::new(
            async_rs::Tokio::current(),
            GuardedReactor(async_rs::Tokio::current()),
        ));
        let tls = (uri.scheme == AMQPScheme::AMQPS).then(|| {
            let name = self
                .server_name
                .clone()
                .unwrap_or_else(|| uri.authority.host.clone());
            (name, self.config.clone())
        });
        // The TCP connection goes to the URL's host; the certificate is checked against the
        // name (`broker_tls_server_name`, else the host).
        let connect = move |uri: AMQPUri, _runtime| {
            let tls = tls.clone();
            async move {
                let host = (uri.authority.host.as_str(), uri.authority.port);
                let addresses: Vec<std::net::SocketAddr> =
                    tokio::net::lookup_host(host).await?.collect();
                let tcp = AsyncTcpStream::connect(&async_rs::Tokio::current(), addresses).await?;
                let stream = match &tls {
                    Some((name, config)) => tcp.into_tls(name, config.as_ref()).await?,
                    None => tcp,
                };
                Ok(AsyncTcpStream::Plain(FrameGuard::new(stream)))
            }
        };
        Connection::connector(uri, runtime, connect, props).await
    }
}

/// A hint for a failed connection whose cause is the broker's certificate.
pub fn hint(error: &str) -> &'static str {
    if error.contains("certificate")
        || error.contains("UnknownIssuer")
        || error.contains("NotValidForName")
    {
        " (TLS: the broker's certificate was not accepted; check `broker_ca` and `broker_tls_server_name`)"
    } else {
        ""
    }
}
