//! Connecting to PostgreSQL: over TLS (rustls) when the URL asks for it with
//! `sslmode=require`, else plain as before; with the server's own words when it refuses
//! (e.g. "password authentication failed"), which the pool would otherwise drop.
//!
//! With TLS the server's certificate is verified: against the system's roots, and against
//! the CA in `sslrootcert=PATH` (a PEM file, libpq's parameter) when the URL gives one.

use diesel::{ConnectionError, ConnectionResult};
use diesel_async::AsyncPgConnection;
use std::{path::Path, sync::Arc};
use tokio_postgres::config::SslMode;

/// Opens a connection to `url` (a `postgres://` URL or `key=value` pairs).
pub async fn establish(url: &str) -> ConnectionResult<AsyncPgConnection> {
    let (url, root) = split_root(url);
    let config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| ConnectionError::InvalidConnectionUrl(chain(&e)))?;
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

/// An error with its causes, on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

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
