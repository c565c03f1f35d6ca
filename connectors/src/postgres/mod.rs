//! PostgreSQL: connection settings, catalog queries, the pgoutput decoder and the change decoder
//! that turns replication messages into [`ferry_schemas::ChangeEvent`]s.

pub mod catalog;
pub mod changes;
pub mod pgoutput;
pub mod pgtext;
pub mod values;

use serde::Deserialize;

use crate::Secret;

/// Where a Postgres database is and how to log in.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PgConfig {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// User; capture needs the REPLICATION attribute (or superuser).
    pub user: String,
    /// Password. Empty: the `PGPASSWORD` environment variable, as libpq does (and nothing, for
    /// trust or peer authentication, when that is unset too).
    #[serde(default)]
    pub password: Secret,
    /// Database name.
    pub database: String,
}

fn default_port() -> u16 {
    5432
}

impl PgConfig {
    /// The password to log in with: `password`, else `PGPASSWORD`, else none.
    pub fn effective_password(&self) -> Option<Secret> {
        if !self.password.expose().is_empty() {
            return Some(self.password.clone());
        }
        std::env::var("PGPASSWORD")
            .ok()
            .filter(|p| !p.is_empty())
            .map(Secret::new)
    }

    /// Settings for an ordinary (non-replication) session with Ferry's pinned text formats.
    pub fn tokio_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.database)
            .application_name("ferry")
            .options(values::SESSION_OPTIONS)
            .connect_timeout(std::time::Duration::from_secs(10));
        if let Some(p) = self.effective_password() {
            c.password(p.expose());
        }
        c
    }

    /// Opens an ordinary session; the connection task is owned by the returned guard.
    pub async fn connect(&self) -> Result<Session, tokio_postgres::Error> {
        let (client, connection) = self.tokio_config().connect(tokio_postgres::NoTls).await?;
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres session ended");
            }
        });
        Ok(Session { client, task })
    }

    /// `host:port/database`, for messages.
    pub fn display(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.database)
    }
}

/// An open ordinary session; dropping it closes the connection.
pub struct Session {
    /// The client.
    pub client: tokio_postgres::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::ops::Deref for Session {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &Self::Target {
        &self.client
    }
}

/// Quotes an identifier for SQL (`"a""b"`).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes a string literal for SQL (`'it''s'`), for the simple-query protocol.
pub fn quote_literal(s: &str) -> String {
    // Like the server's quote_literal(): a backslash makes it an E'' string with backslashes
    // doubled, which reads the same whatever standard_conforming_strings says.
    if s.contains('\\') {
        format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_read_the_same_under_either_string_setting() {
        assert_eq!(quote_literal("plain"), "'plain'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"a\b'c"), r"E'a\\b''c'");
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
    }
}
