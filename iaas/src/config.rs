//! The QingCloud SDK's `config.yaml`, as hostnic mounts it (ConfigMap `hostnic-qingcloud` or
//! Secret `qcsecret`, key `config.yaml`): `qy_access_key_id`, `qy_secret_access_key`, `zone`,
//! `host`, `port`, `protocol`, `uri`, `connection_retries`, `connection_timeout`. Missing keys
//! keep the SDK's defaults; keys the SDK knows but we do not use (`log_level`, the
//! `credential_proxy_*` ones) and unknown keys are ignored, as the Go SDK ignores them, so
//! hostnic's files work unchanged.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::Value;

/// Where the SDK reads its config (`~/.qingcloud/config.yaml`); hostnic's DaemonSet mounts the
/// `config.yaml` key of its ConfigMap or Secret there for root.
pub const SDK_CONFIG_PATH: &str = "/root/.qingcloud/config.yaml";

/// The secret access key. Its `Debug` says only that it is redacted, it has no `Display`, and
/// nothing in this crate formats it: it is read only to compute signatures.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(String);

impl SecretKey {
    /// Wraps a secret access key.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The key's bytes, for HMAC only.
    pub(crate) fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Plain HTTP (a simulator on loopback, a private cloud behind a proxy).
    Http,
    /// HTTPS, the default.
    Https,
}

impl Protocol {
    /// The URL scheme.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// Where and as whom the client calls the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `qy_access_key_id`.
    pub access_key_id: String,
    /// `qy_secret_access_key`.
    pub secret_access_key: SecretKey,
    /// `zone`, sent with every request (e.g. `pek3a`).
    pub zone: String,
    /// `protocol` (default `https`).
    pub protocol: Protocol,
    /// `host` (default `api.qingcloud.com`).
    pub host: String,
    /// `port` (default 443).
    pub port: u16,
    /// `uri` (default `/iaas`; runs of `/` collapsed, as the Go SDK does). Signed as sent.
    pub uri: String,
    /// `connection_retries` (default 3): a request is tried at most this many times more.
    pub connection_retries: u32,
    /// `connection_timeout` in seconds (default 30): the limit on connecting.
    pub connection_timeout: Duration,
}

/// A `config.yaml` that cannot be used; the message names the key and never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("QingCloud config{}: {reason}", source_name.as_deref().map(|s| format!(" {s}")).unwrap_or_default())]
pub struct ConfigError {
    /// The file, when read from one.
    pub source_name: Option<String>,
    /// What is wrong.
    pub reason: String,
}

impl ConfigError {
    fn new(reason: impl Into<String>) -> Self {
        Self {
            source_name: None,
            reason: reason.into(),
        }
    }
}

/// The keys as written. Values are kept as YAML values so that a value of the wrong type is
/// reported by key, without the YAML library quoting it (it could be the secret).
#[derive(Deserialize, Default)]
struct RawConfig {
    qy_access_key_id: Option<Value>,
    qy_secret_access_key: Option<Value>,
    zone: Option<Value>,
    host: Option<Value>,
    port: Option<Value>,
    protocol: Option<Value>,
    uri: Option<Value>,
    connection_retries: Option<Value>,
    connection_timeout: Option<Value>,
}

fn scalar_string(key: &str, value: Option<Value>) -> Result<Option<String>, ConfigError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(ConfigError::new(format!("{key} must be a string"))),
    }
}

fn unsigned(key: &str, value: Option<Value>, max: u64) -> Result<Option<u64>, ConfigError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if v <= max => Ok(Some(v)),
            _ => Err(ConfigError::new(format!(
                "{key} must be a whole number from 0 to {max}, not {n}"
            ))),
        },
        Some(_) => Err(ConfigError::new(format!("{key} must be a number"))),
    }
}

impl Config {
    /// A config for `access_key_id`/`secret` in `zone`, with the SDK's defaults for the rest.
    pub fn new(access_key_id: &str, secret: SecretKey, zone: &str) -> Self {
        Self {
            access_key_id: access_key_id.to_string(),
            secret_access_key: secret,
            zone: zone.to_string(),
            protocol: Protocol::Https,
            host: "api.qingcloud.com".to_string(),
            port: 443,
            uri: "/iaas".to_string(),
            connection_retries: 3,
            connection_timeout: Duration::from_secs(30),
        }
    }

    /// Parses a `config.yaml`.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| {
                // The library's message can quote a value; give only where it failed.
                let at = e
                    .location()
                    .map(|l| format!(" at line {} column {}", l.line(), l.column()))
                    .unwrap_or_default();
                ConfigError::new(format!("not a YAML mapping of the SDK's keys{at}"))
            })?
        };
        let access_key_id = scalar_string("qy_access_key_id", raw.qy_access_key_id)?;
        let secret = scalar_string("qy_secret_access_key", raw.qy_secret_access_key)?;
        let (access_key_id, secret) = match (access_key_id, secret) {
            (Some(a), Some(s)) if !a.is_empty() && !s.is_empty() => (a, SecretKey::new(s)),
            (None, None) => {
                return Err(ConfigError::new(
                    "qy_access_key_id and qy_secret_access_key are missing: set both (the \
                     credential-proxy mode without keys is not supported)",
                ))
            }
            (Some(a), _) if !a.is_empty() => {
                return Err(ConfigError::new("qy_secret_access_key is missing or empty"))
            }
            _ => return Err(ConfigError::new("qy_access_key_id is missing or empty")),
        };
        let zone = scalar_string("zone", raw.zone)?
            .filter(|z| !z.is_empty())
            .ok_or_else(|| {
                ConfigError::new("zone is missing: set zone to the instances' zone, e.g. pek3a")
            })?;
        if !zone
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(ConfigError::new(format!(
                "zone {zone:?} is not a zone id (lowercase letters and digits, e.g. pek3a)"
            )));
        }
        let mut config = Self::new(&access_key_id, secret, &zone);
        if let Some(host) = scalar_string("host", raw.host)? {
            if host.is_empty() || host.contains(['/', ' ', '?', '#', '@']) {
                return Err(ConfigError::new(format!(
                    "host {host:?} is not a host name"
                )));
            }
            config.host = host;
        }
        if let Some(protocol) = scalar_string("protocol", raw.protocol)? {
            config.protocol = match protocol.as_str() {
                "https" => Protocol::Https,
                "http" => Protocol::Http,
                other => {
                    return Err(ConfigError::new(format!(
                        "protocol {other:?} is neither http nor https"
                    )))
                }
            };
        }
        if let Some(port) = unsigned("port", raw.port, u64::from(u16::MAX))? {
            config.port = u16::try_from(port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| ConfigError::new("port must be from 1 to 65535, not 0"))?;
        }
        if let Some(uri) = scalar_string("uri", raw.uri)? {
            if !uri.starts_with('/') || uri.contains(['?', '#', ' ']) {
                return Err(ConfigError::new(format!(
                    "uri {uri:?} is not a path starting with /"
                )));
            }
            let mut collapsed = String::with_capacity(uri.len());
            for c in uri.chars() {
                if !(c == '/' && collapsed.ends_with('/')) {
                    collapsed.push(c);
                }
            }
            config.uri = collapsed;
        }
        if let Some(retries) = unsigned("connection_retries", raw.connection_retries, 100)? {
            config.connection_retries = u32::try_from(retries).unwrap_or(100);
        }
        if let Some(secs) = unsigned("connection_timeout", raw.connection_timeout, 3600)? {
            if secs == 0 {
                return Err(ConfigError::new(
                    "connection_timeout must be at least 1 second",
                ));
            }
            config.connection_timeout = Duration::from_secs(secs);
        }
        Ok(config)
    }

    /// Reads and parses a `config.yaml` file; errors name the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let name = Some(path.display().to_string());
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: name.clone(),
            reason: format!("cannot be read: {e}"),
        })?;
        Self::from_yaml(&text).map_err(|e| ConfigError {
            source_name: name,
            reason: e.reason,
        })
    }

    /// `protocol://host:port`, without the path.
    pub fn origin(&self) -> String {
        format!("{}://{}:{}", self.protocol.as_str(), self.host, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnic_public_and_private_cloud_examples_parse() {
        let public = Config::from_yaml(
            "qy_access_key_id: 'ACCESS_KEY_ID'\nqy_secret_access_key: 'SECRET_ACCESS_KEY'\nzone: \"pek3a\"  # your instance zone\n",
        )
        .expect("public example");
        assert_eq!(public.access_key_id, "ACCESS_KEY_ID");
        assert_eq!(
            public.secret_access_key,
            SecretKey::new("SECRET_ACCESS_KEY")
        );
        assert_eq!(public.zone, "pek3a");
        assert_eq!(public.origin(), "https://api.qingcloud.com:443");
        assert_eq!(public.uri, "/iaas");
        assert_eq!(public.connection_retries, 3);

        let private = Config::from_yaml(
            "qy_access_key_id: 'ACCESS_KEY_ID'\nqy_secret_access_key: 'SECRET_ACCESS_KEY'\nzone: sh1a\nhost: 'api.xxxxx.com'\nport: 8080\nprotocol: 'http'\nuri: '//iaas//'\nconnection_retries: 5\nconnection_timeout: 10\nlog_level: 'warn'\ncredential_proxy_host: x\nsomething_else: 1\n",
        )
        .expect("private example");
        assert_eq!(private.origin(), "http://api.xxxxx.com:8080");
        assert_eq!(private.uri, "/iaas/");
        assert_eq!(private.connection_retries, 5);
        assert_eq!(private.connection_timeout, Duration::from_secs(10));
    }

    #[test]
    fn bad_files_are_refused_naming_the_key_and_never_the_secret() {
        let base = "qy_access_key_id: AK\nqy_secret_access_key: TOPSECRET\nzone: pek3a\n";
        let cases = [
            (
                "qy_access_key_id: AK\nzone: pek3a\n",
                "qy_secret_access_key",
            ),
            (
                "qy_secret_access_key: TOPSECRET\nzone: pek3a\n",
                "qy_access_key_id",
            ),
            ("zone: pek3a\n", "credential-proxy"),
            (
                "qy_access_key_id: AK\nqy_secret_access_key: TOPSECRET\n",
                "zone is missing",
            ),
            (&format!("{base}protocol: ftp\n"), "protocol"),
            (&format!("{base}port: 70000\n"), "port"),
            (&format!("{base}port: 0\n"), "port"),
            (&format!("{base}port: abc\n"), "port must be a number"),
            (&format!("{base}uri: iaas\n"), "uri"),
            (
                &format!("{base}connection_timeout: 0\n"),
                "connection_timeout",
            ),
            (&format!("{base}host: 'a/b'\n"), "host"),
            (
                "qy_access_key_id: AK\nqy_secret_access_key: [TOPSECRET]\nzone: pek3a\n",
                "qy_secret_access_key must be a string",
            ),
            (
                "qy_access_key_id: AK\nqy_secret_access_key: TOPSECRET\n  zone: - pek3a\n",
                "line",
            ),
            ("- TOPSECRET\n", "not a YAML mapping"),
        ];
        for (text, needle) in cases {
            let err = Config::from_yaml(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(!err.contains("TOPSECRET"), "{err}");
        }
    }

    #[test]
    fn debug_output_redacts_the_secret() {
        let config = Config::from_yaml(
            "qy_access_key_id: AK\nqy_secret_access_key: TOPSECRET\nzone: pek3a\n",
        )
        .expect("parses");
        let debug = format!("{config:?} {config:#?}");
        assert!(!debug.contains("TOPSECRET"), "{debug}");
        assert!(debug.contains("<redacted>"));
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.yaml");
        let err = Config::load(&path).expect_err("missing file").to_string();
        assert!(
            err.contains("config.yaml") && err.contains("cannot be read"),
            "{err}"
        );
        std::fs::write(&path, "qy_access_key_id: AK\n").expect("write");
        let err = Config::load(&path).expect_err("no secret").to_string();
        assert!(
            err.contains("config.yaml") && err.contains("qy_secret_access_key"),
            "{err}"
        );
    }
}
