//! Connecting to PostgreSQL: over TLS (rustls) when the URL asks for it with
//! `sslmode=require`, else plain as before; with the server's own words when it refuses
//! (e.g. "password authentication failed"), which the pool would otherwise drop.
//!
//! With TLS the server's certificate is verified: against the system's roots, and against
//! the CA in `sslrootcert=PATH` (a PEM file, libpq's parameter) when the URL gives one.
//!
//! A URL may name several servers (`postgres://u@h1:5432,h2:5432/db?target_session_attrs=
//! read-write`, or `host=h1,h2`): they are tried in order, and with `read-write` only one
//! that takes writes is kept, so after a failover new connections find the new primary.

use diesel::{ConnectionError, ConnectionResult};
use diesel_async::AsyncPgConnection;
use std::{path::Path, sync::Arc, time::Duration};
use tokio_postgres::config::SslMode;

/// How long one attempt to reach one server may take when the URL does not say
/// (`connect_timeout`, seconds): a server whose machine is gone answers nothing, and without
/// a bound each new connection would wait out the system's TCP timeout (minutes) on it
/// before trying the next server of the URL.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long data sent to a server may go unacknowledged before the connection counts as
/// lost, when the URL does not say (`tcp_user_timeout`, seconds; Linux): a statement sent to
/// a server that vanished fails then, and is retried, rather than waiting for hours of TCP
/// retransmissions.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens a connection to `url` (a `postgres://` URL or `key=value` pairs).
pub async fn establish(url: &str) -> ConnectionResult<AsyncPgConnection> {
    let (url, root) = split_root(url);
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| ConnectionError::InvalidConnectionUrl(chain(&e)))?;
    with_timeouts(&mut config);
    let refused = |e: tokio_postgres::Error| ConnectionError::BadConnection(chain(&e));
    if config.get_ssl_mode() == SslMode::Require {
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client_config(root.as_deref())?);
        let (client, conn) = config.connect(tls).await.map_err(refused)?;
        AsyncPgConnection::try_from_client_and_connection(client, conn).await
    } else {
        let (client, conn) = config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(refused)?;
        AsyncPgConnection::try_from_client_and_connection(client, conn).await
    }
}

/// The bounds a failover needs, where the URL sets none.
fn with_timeouts(config: &mut tokio_postgres::Config) {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
}

/// The URL without `sslrootcert` (tokio-postgres does not take it), and its value.
fn split_root(url: &str) -> (String, Option<String>) {
    let is_root = |kv: &str| kv.starts_with("sslrootcert=");
    if let Some((base, query)) = url.split_once('?') {
        let root = query
            .split('&')
            .find(|kv| is_root(kv))
            .map(|kv| kv["sslrootcert=".len()..].to_owned());
        let rest: Vec<&str> = query.split('&').filter(|kv| !is_root(kv)).collect();
        let url = if rest.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        return (url, root);
    }
    if url.contains("://") {
        return (url.to_owned(), None);
    }
    let root = url
        .split_whitespace()
        .find(|kv| is_root(kv))
        .map(|kv| kv["sslrootcert=".len()..].to_owned());
    let rest: Vec<&str> = url.split_whitespace().filter(|kv| !is_root(kv)).collect();
    (rest.join(" "), root)
}

fn client_config(root: Option<&str>) -> ConnectionResult<rustls::ClientConfig> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let bad = |what: String| ConnectionError::BadConnection(what);
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system certificate rustls cannot use is skipped, as every TLS client does.
        let _ = roots.add(cert);
    }
    if let Some(path) = root {
        let certs = CertificateDer::pem_file_iter(Path::new(path))
            .map_err(|e| bad(format!("sslrootcert {path}: {e}")))?;
        for cert in certs {
            let cert = cert.map_err(|e| bad(format!("sslrootcert {path}: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| bad(format!("sslrootcert {path}: {e}")))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// `url` without its password, for messages and logs.
pub fn redacted(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((auth, host)) = rest.split_once('@')
            && let Some((user, _)) = auth.split_once(':')
        {
            return format!("{scheme}://{user}:***@{host}");
        }
        return url.to_owned();
    }
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) use berth_proto::text::error_chain as chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_left_out_of_what_is_shown() {
        assert_eq!(
            redacted("postgres://postgres:s3cret@127.0.0.1:5433/postgres"),
            "postgres://postgres:***@127.0.0.1:5433/postgres"
        );
        assert_eq!(
            redacted("postgres://postgres@127.0.0.1/postgres"),
            "postgres://postgres@127.0.0.1/postgres"
        );
        assert_eq!(
            redacted("host=h password=s3cret user=u"),
            "host=h password=*** user=u"
        );
    }

    #[test]
    fn urls_naming_several_servers_keep_them_all_and_the_read_write_rule() {
        use tokio_postgres::config::{Host, TargetSessionAttrs};
        for url in [
            "postgres://u:pw@10.0.0.1:5432,10.0.0.2:5433/db?target_session_attrs=read-write\
             &sslmode=require&sslrootcert=/ca.pem",
            "host=10.0.0.1,10.0.0.2 port=5432,5433 user=u password=pw dbname=db \
             target_session_attrs=read-write sslmode=require sslrootcert=/ca.pem",
        ] {
            let (rest, root) = split_root(url);
            assert_eq!(root.as_deref(), Some("/ca.pem"), "{url}");
            let config: tokio_postgres::Config = rest.parse().expect(url);
            assert_eq!(
                config.get_hosts(),
                [Host::Tcp("10.0.0.1".into()), Host::Tcp("10.0.0.2".into())],
                "{url}"
            );
            assert_eq!(config.get_ports(), [5432, 5433], "{url}");
            assert_eq!(
                config.get_target_session_attrs(),
                TargetSessionAttrs::ReadWrite,
                "{url}"
            );
            assert_eq!(config.get_ssl_mode(), SslMode::Require, "{url}");
            assert_eq!(redacted(url).matches("pw").count(), 0, "{}", redacted(url));
        }
    }

    #[test]
    fn connections_get_failover_timeouts_unless_the_url_sets_its_own() {
        let mut config: tokio_postgres::Config = "postgres://u@h1,h2/db".parse().expect("url");
        with_timeouts(&mut config);
        assert_eq!(config.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert_eq!(config.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        let mut config: tokio_postgres::Config =
            "postgres://u@h1,h2/db?connect_timeout=3&tcp_user_timeout=7"
                .parse()
                .expect("url");
        with_timeouts(&mut config);
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(config.get_tcp_user_timeout(), Some(&Duration::from_secs(7)));
    }

    #[test]
    fn sslrootcert_is_taken_out_of_urls_and_pairs() {
        assert_eq!(
            split_root("postgres://u@h/db?sslmode=require&sslrootcert=/ca.pem"),
            (
                "postgres://u@h/db?sslmode=require".into(),
                Some("/ca.pem".into())
            )
        );
        assert_eq!(
            split_root("postgres://u@h/db?sslrootcert=/ca.pem"),
            ("postgres://u@h/db".into(), Some("/ca.pem".into()))
        );
        assert_eq!(
            split_root("host=h sslmode=require sslrootcert=/ca.pem"),
            ("host=h sslmode=require".into(), Some("/ca.pem".into()))
        );
        assert_eq!(
            split_root("postgres://u@h/db"),
            ("postgres://u@h/db".into(), None)
        );
    }
}
