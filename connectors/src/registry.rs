//! A Confluent-compatible schema registry (Confluent Schema Registry, Apicurio Registry's
//! `ccompat` API, Karapace, ...): registering writer schemas under subjects and fetching a schema
//! by its id, which the Confluent wire format writes in every record.
//!
//! Ids belong to one registry: the same schema has different ids in the origin's and the
//! destination's registries, so every id Ferry writes comes from the registry of the cluster it
//! writes to. Answers are cached: a subject's id for a schema text and a schema text for an id
//! never change once the registry has given them.
//!
//! Failures are classified by the HTTP status, never by message text: no answer, a 5xx, 408 and
//! 429 are transient (retry with back-off; nothing is lost, the caller has not moved its
//! position); any other 4xx (bad credentials, an incompatible schema, an unknown id) is permanent.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;

use crate::Secret;

/// How to reach a schema registry.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base URL of the Confluent-compatible API, e.g. `http://127.0.0.1:18081/apis/ccompat/v7`
    /// for Apicurio or `https://psrc-xxxx.confluent.cloud` for Confluent Cloud.
    pub url: String,
    /// Basic-auth user (empty: no authentication).
    #[serde(default)]
    pub username: String,
    /// Basic-auth password (an API secret for Confluent Cloud).
    #[serde(default)]
    pub password: Secret,
    /// PEM file of CA certificates to trust for an `https` URL, beside the system's.
    #[serde(default)]
    pub ca_file: String,
    /// Time limit for one request. 10 s covers a registry under load; past it the request is
    /// retried as a transient failure.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// A registry request that failed.
#[derive(Debug, thiserror::Error)]
#[error("schema registry {registry} ({url}): {action}: {reason}")]
pub struct RegistryError {
    /// `origin` or `destination`.
    pub registry: String,
    /// The registry's base URL.
    pub url: String,
    /// What was being done.
    pub action: String,
    /// What went wrong (the HTTP status and the registry's message, or the transport error).
    pub reason: String,
    /// The HTTP status, when the registry answered.
    pub status: Option<u16>,
    /// A failure no retry can mend although no HTTP answer came: a certificate the client does
    /// not trust, a malformed URL, an unreadable CA file.
    pub permanent: bool,
}

impl RegistryError {
    /// Whether trying again later may succeed: no answer (unless the TLS handshake or the
    /// setup refused), 5xx, 408, 429.
    pub fn is_retryable(&self) -> bool {
        match self.status {
            None => !self.permanent,
            Some(s) => s >= 500 || s == 408 || s == 429,
        }
    }
}

/// A schema registry client with its caches; cheap to clone (shared state).
#[derive(Clone)]
pub struct SchemaRegistry {
    name: String,
    cfg: RegistryConfig,
    agent: ureq::Agent,
    ids: Arc<Mutex<HashMap<(String, String), u32>>>,
    schemas: Arc<Mutex<HashMap<u32, Arc<str>>>>,
}

impl fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SchemaRegistry")
            .field("name", &self.name)
            .field("url", &self.cfg.url)
            .finish()
    }
}

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

#[derive(Deserialize)]
struct IdAnswer {
    id: u32,
}

#[derive(Deserialize)]
struct SchemaAnswer {
    schema: String,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    #[serde(default)]
    message: String,
    #[serde(default)]
    error_code: i64,
}

/// Percent-encodes a subject for a URL path (topic names are mostly safe already).
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl SchemaRegistry {
    /// A client for the registry `cfg` names; `name` (`origin`, `destination`) goes in errors.
    /// Fails only on a CA file that cannot be read.
    pub fn new(name: &str, cfg: RegistryConfig) -> Result<SchemaRegistry, RegistryError> {
        let err = |reason: String| RegistryError {
            registry: name.to_string(),
            url: cfg.url.clone(),
            action: "setting up the client".into(),
            reason,
            status: None,
            permanent: true,
        };
        let mut tls = ureq::tls::TlsConfig::builder().provider(ureq::tls::TlsProvider::NativeTls);
        if !cfg.ca_file.is_empty() {
            let pem = std::fs::read(&cfg.ca_file)
                .map_err(|e| err(format!("reading ca_file {}: {e}", cfg.ca_file)))?;
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c.to_owned()),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err(err(format!("ca_file {} holds no certificate", cfg.ca_file)));
            }
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(cfg.timeout_ms.max(1))))
            .http_status_as_error(false)
            .tls_config(tls.build())
            .build()
            .into();
        Ok(SchemaRegistry {
            name: name.to_string(),
            cfg,
            agent,
            ids: Arc::default(),
            schemas: Arc::default(),
        })
    }

    /// The registry's base URL.
    pub fn url(&self) -> &str {
        &self.cfg.url
    }

    fn error(&self, action: &str, reason: String, status: Option<u16>) -> RegistryError {
        RegistryError {
            registry: self.name.clone(),
            url: self.cfg.url.clone(),
            action: action.to_string(),
            reason,
            status,
            permanent: false,
        }
    }

    /// One request, blocking: `body` is JSON for POST; returns the answer's body.
    fn call(
        &self,
        action: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<String, RegistryError> {
        let url = format!("{}{path}", self.cfg.url.trim_end_matches('/'));
        let auth = (!self.cfg.username.is_empty()).then(|| {
            use base64_lite::encode;
            format!(
                "Basic {}",
                encode(format!("{}:{}", self.cfg.username, self.cfg.password.expose()).as_bytes())
            )
        });
        let result = match body {
            Some(body) => {
                let mut req = self
                    .agent
                    .post(&url)
                    .header("Content-Type", CONTENT_TYPE)
                    .header("Accept", CONTENT_TYPE);
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.send(body)
            }
            None => {
                let mut req = self.agent.get(&url).header("Accept", CONTENT_TYPE);
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.call()
            }
        };
        let mut resp = result.map_err(|e| {
            let permanent = matches!(
                e,
                ureq::Error::Tls(_)
                    | ureq::Error::NativeTls(_)
                    | ureq::Error::Der(_)
                    | ureq::Error::BadUri(_)
                    | ureq::Error::RequireHttpsOnly(_)
            );
            RegistryError {
                permanent,
                ..self.error(action, e.to_string(), None)
            }
        })?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| self.error(action, format!("reading the answer: {e}"), None))?;
        if (200..300).contains(&status) {
            return Ok(text);
        }
        let reason = match serde_json::from_str::<ErrorAnswer>(&text) {
            Ok(a) if !a.message.is_empty() => {
                format!("HTTP {status} (error code {}): {}", a.error_code, a.message)
            }
            _ => format!(
                "HTTP {status}: {}",
                text.chars().take(300).collect::<String>()
            ),
        };
        Err(self.error(action, reason, Some(status)))
    }

    /// [`SchemaRegistry::call`], the answer parsed as `T`.
    fn answer<T: serde::de::DeserializeOwned>(
        &self,
        action: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<T, RegistryError> {
        let text = self.call(action, path, body)?;
        serde_json::from_str(&text).map_err(|e| {
            self.error(
                action,
                format!("unexpected answer {text:?}: {e}"),
                Some(200),
            )
        })
    }

    /// Registers `schema` (Avro JSON text) under `subject` and returns its id; the registry
    /// returns the existing id when the subject already has that schema. Blocks: call it from
    /// blocking code, or use [`SchemaRegistry::register`].
    pub fn register_blocking(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let key = (subject.to_string(), schema.to_string());
        if let Some(id) = self.ids.lock().ok().and_then(|m| m.get(&key).copied()) {
            return Ok(id);
        }
        let body = serde_json::json!({ "schema": schema, "schemaType": "AVRO" }).to_string();
        let id = self
            .answer::<IdAnswer>(
                &format!("registering a schema under subject {subject}"),
                &format!("/subjects/{}/versions", path_segment(subject)),
                Some(body),
            )?
            .id;
        if let Ok(mut m) = self.ids.lock() {
            m.insert(key, id);
        }
        if let Ok(mut m) = self.schemas.lock() {
            m.entry(id).or_insert_with(|| Arc::from(schema));
        }
        Ok(id)
    }

    /// [`SchemaRegistry::register_blocking`] on a blocking thread.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let (this, subject, schema) = (self.clone(), subject.to_string(), schema.to_string());
        tokio::task::spawn_blocking(move || this.register_blocking(&subject, &schema))
            .await
            .map_err(|e| self.error("registering a schema", e.to_string(), None))?
    }

    /// The schema text with this id. Blocks, like [`SchemaRegistry::register_blocking`].
    pub fn schema_blocking(&self, id: u32) -> Result<Arc<str>, RegistryError> {
        if let Some(s) = self.schemas.lock().ok().and_then(|m| m.get(&id).cloned()) {
            return Ok(s);
        }
        let schema: Arc<str> = Arc::from(
            self.answer::<SchemaAnswer>(
                &format!("fetching schema id {id}"),
                &format!("/schemas/ids/{id}"),
                None,
            )?
            .schema,
        );
        if let Ok(mut m) = self.schemas.lock() {
            m.insert(id, schema.clone());
        }
        Ok(schema)
    }

    /// The subjects the registry knows (for `ferry check`).
    pub async fn subjects(&self) -> Result<Vec<String>, RegistryError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.answer("listing subjects", "/subjects", None))
            .await
            .map_err(|e| self.error("listing subjects", e.to_string(), None))?
    }
}

/// The subject of a topic's key or value schema under the topic-name strategy.
pub fn subject(topic: &str, key: bool) -> String {
    format!("{topic}-{}", if key { "key" } else { "value" })
}

/// Standard base64 (RFC 4648 with padding), for the basic-auth header only.
mod base64_lite {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(input: &[u8]) -> String {
        let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
        for chunk in input.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_lite::encode(plain.as_bytes()), enc);
        }
    }

    #[test]
    fn subjects_follow_the_topic_name_strategy_and_encode_safely() {
        assert_eq!(subject("ferry.public.t", false), "ferry.public.t-value");
        assert_eq!(subject("ferry.public.t", true), "ferry.public.t-key");
        assert_eq!(path_segment("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn only_no_answer_5xx_408_429_are_retried() {
        let e = |status| RegistryError {
            registry: "o".into(),
            url: "u".into(),
            action: "a".into(),
            reason: "r".into(),
            status,
            permanent: false,
        };
        assert!(e(None).is_retryable());
        assert!(e(Some(503)).is_retryable());
        assert!(e(Some(429)).is_retryable());
        assert!(e(Some(408)).is_retryable());
        assert!(!e(Some(409)).is_retryable());
        assert!(!e(Some(401)).is_retryable());
        assert!(!e(Some(404)).is_retryable());
        let refused = RegistryError {
            permanent: true,
            ..e(None)
        };
        assert!(
            !refused.is_retryable(),
            "an untrusted certificate is not retried"
        );
    }
}
