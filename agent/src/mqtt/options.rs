//! Connection options shared by the daemon and the operator commands (`watch`, later `push`):
//! broker address, credentials, and TLS through rustls with the ring provider (no C toolchain
//! in the aarch64 cross build). Every file problem names the setting and the file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::BrokerUrl;

/// The largest packet the agent accepts: a 256 KiB model chunk plus its envelope, with room.
/// Larger messages are refused by the client library and cost a reconnect; operators should
/// set the broker's `message_size_limit` to match (docs/protocol.md).
pub const MAX_INCOMING_PACKET: usize = 1024 * 1024;
/// The largest packet the agent sends (a telemetry record is about 1 KiB; a push chunk 256 KiB).
pub const MAX_OUTGOING_PACKET: usize = 1024 * 1024;
/// Requests queued between the client handle and the event loop.
pub const REQUEST_CHANNEL_CAPACITY: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("{setting} {}: {message}", path.display())]
    File {
        setting: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{setting} is set but the broker URL {url} is not mqtts://")]
    TlsWithoutMqtts { setting: &'static str, url: String },
    #[error("mqtt.cert_file and mqtt.key_file go together: {0}")]
    HalfClientCertificate(&'static str),
    #[error("TLS client setup: {0}")]
    Tls(String),
}

/// How to connect (the broker's URL is given to `options`): what the daemon's config or an
/// operator's flags say.
#[derive(Clone, Debug, Default)]
pub struct Connection {
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl Connection {
    /// Client options for `client_id`, persistent session (so QoS 1 subscriptions survive
    /// reconnects) unless `clean_session`, keep-alive `keep_alive`.
    pub fn options(
        &self,
        url: &BrokerUrl,
        client_id: &str,
        keep_alive: Duration,
        clean_session: bool,
    ) -> Result<MqttOptions, MqttError> {
        let mut options = MqttOptions::new(client_id, url.host.clone(), url.port);
        options
            .set_keep_alive(keep_alive)
            .set_clean_session(clean_session)
            .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET)
            .set_request_channel_capacity(REQUEST_CHANNEL_CAPACITY);
        if let Some(username) = self.username.as_deref().filter(|u| !u.is_empty()) {
            let password = match &self.password_file {
                Some(path) => read_file("mqtt.password_file", path)
                    .map(|bytes| String::from_utf8_lossy(&bytes).trim_end().to_string())?,
                None => String::new(),
            };
            options.set_credentials(username, password);
        }
        if url.tls {
            options.set_transport(Transport::tls_with_config(self.tls()?));
        } else if let Some(setting) = self.tls_setting() {
            return Err(MqttError::TlsWithoutMqtts {
                setting,
                url: url.to_string(),
            });
        }
        Ok(options)
    }

    fn tls_setting(&self) -> Option<&'static str> {
        if self.ca_file.is_some() {
            Some("mqtt.ca_file")
        } else if self.cert_file.is_some() {
            Some("mqtt.cert_file")
        } else if self.key_file.is_some() {
            Some("mqtt.key_file")
        } else {
            None
        }
    }

    /// A rustls client on the ring provider that verifies the broker against `ca_file` (or the
    /// platform's roots when none is set) and presents a client certificate when one is set.
    fn tls(&self) -> Result<TlsConfiguration, MqttError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                let certs = certificates("mqtt.ca_file", path)?;
                for cert in certs {
                    roots.add(cert).map_err(|e| MqttError::File {
                        setting: "mqtt.ca_file",
                        path: path.clone(),
                        message: format!("not a usable CA certificate: {e}"),
                    })?;
                }
            }
            None => {
                let found = rustls_native_roots();
                if found.is_empty() {
                    return Err(MqttError::Tls(
                        "mqtts:// without mqtt.ca_file and no system CA certificates found \
                         in /etc/ssl/certs: set mqtt.ca_file"
                            .into(),
                    ));
                }
                for cert in found {
                    let _ = roots.add(cert);
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| MqttError::Tls(e.to_string()))?
            .with_root_certificates(roots);
        let config = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let chain = certificates("mqtt.cert_file", cert)?;
                let key = private_key(key)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| MqttError::Tls(format!("client certificate and key: {e}")))?
            }
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => return Err(MqttError::HalfClientCertificate("key_file is missing")),
            (None, Some(_)) => {
                return Err(MqttError::HalfClientCertificate("cert_file is missing"))
            }
        };
        Ok(TlsConfiguration::Rustls(Arc::new(config)))
    }
}

fn read_file(setting: &'static str, path: &Path) -> Result<Vec<u8>, MqttError> {
    std::fs::read(path).map_err(|e| MqttError::File {
        setting,
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn certificates(
    setting: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, MqttError> {
    let bytes = read_file(setting, path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| MqttError::File {
            setting,
            path: path.to_path_buf(),
            message: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(MqttError::File {
            setting,
            path: path.to_path_buf(),
            message: "no PEM certificate in the file".into(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, MqttError> {
    let bytes = read_file("mqtt.key_file", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| MqttError::File {
        setting: "mqtt.key_file",
        path: path.to_path_buf(),
        message: format!("no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
    })
}

/// The system's CA bundle (Debian and Ubuntu, so Jetson Linux): used when a broker with a
/// public certificate is configured without `ca_file`.
fn rustls_native_roots() -> Vec<CertificateDer<'static>> {
    const BUNDLES: [&str; 2] = [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ];
    BUNDLES
        .iter()
        .filter_map(|path| std::fs::read(path).ok())
        .flat_map(|bytes| {
            CertificateDer::pem_slice_iter(&bytes)
                .filter_map(Result::ok)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> BrokerUrl {
        BrokerUrl::parse(s).unwrap()
    }

    #[test]
    fn plain_connection_with_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "s3cret\n").unwrap();
        let connection = Connection {
            username: Some("jetson-017".into()),
            password_file: Some(password),
            ..Connection::default()
        };
        let options = connection
            .options(
                &url("mqtt://127.0.0.1:1883"),
                "jetson-017",
                Duration::from_secs(30),
                false,
            )
            .unwrap();
        assert!(!options.clean_session());
        assert_eq!(options.keep_alive(), Duration::from_secs(30));
        let login = options.credentials().unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("jetson-017", "s3cret")
        );
    }

    #[test]
    fn tls_file_problems_name_the_setting_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("ca.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let check = |connection: Connection, broker: &str, expected: String| {
            let error = connection
                .options(&url(broker), "d", Duration::from_secs(30), false)
                .unwrap_err();
            assert_eq!(error.to_string(), expected);
        };
        check(
            Connection {
                ca_file: Some(garbage.clone()),
                ..Connection::default()
            },
            "mqtts://broker:8883",
            format!(
                "mqtt.ca_file {}: no PEM certificate in the file",
                garbage.display()
            ),
        );
        check(
            Connection {
                ca_file: Some(dir.path().join("missing.pem")),
                ..Connection::default()
            },
            "mqtts://broker:8883",
            format!(
                "mqtt.ca_file {}: No such file or directory (os error 2)",
                dir.path().join("missing.pem").display()
            ),
        );
        check(
            Connection {
                ca_file: Some(garbage.clone()),
                ..Connection::default()
            },
            "mqtt://broker:1883",
            "mqtt.ca_file is set but the broker URL mqtt://broker:1883 is not mqtts://".into(),
        );
    }
}
