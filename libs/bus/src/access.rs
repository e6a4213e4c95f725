//! How a process proves who it is to NATS, and how it reaches it: an nkey seed file (the
//! role's credentials, made by `berth auth`), TLS with a trusted CA, and whether it sets up
//! the streams (only analyzers may, once NATS permissions are on).

use crate::BusError;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Access {
    /// A file holding an nkey seed (`SU…`, as `berth auth` writes them), or a NATS `.creds`
    /// file (JWT and seed). None: connect without credentials.
    pub creds: Option<PathBuf>,
    /// A CA certificate (PEM) to trust for `tls://` servers; with it, TLS is required.
    pub tls_ca: Option<PathBuf>,
    /// Create or update berth's streams at connect (analyzers, tests, benchmarks). Others
    /// only use them: under NATS permissions they may not create them.
    pub provision: bool,
    /// Reply subjects start with this (an agent's permissions allow only its own).
    pub inbox_prefix: Option<String>,
}

impl Default for Access {
    /// No credentials, no TLS, and the streams set up.
    fn default() -> Access {
        Access {
            creds: None,
            tls_ca: None,
            provision: true,
            inbox_prefix: None,
        }
    }
}

impl Access {
    /// For a process that only uses the streams.
    pub fn user(creds: Option<PathBuf>, tls_ca: Option<PathBuf>) -> Access {
        Access {
            creds,
            tls_ca,
            provision: false,
            inbox_prefix: None,
        }
    }

    /// Connect options with these credentials, TLS and inbox prefix.
    pub async fn connect_options(
        &self,
        name: &str,
    ) -> Result<async_nats::ConnectOptions, BusError> {
        let mut opts = match &self.creds {
            None => async_nats::ConnectOptions::new(),
            Some(path) => credentials(path).await?,
        };
        opts = opts.name(name);
        if let Some(ca) = &self.tls_ca {
            if !ca.is_file() {
                return Err(BusError::Credentials {
                    path: ca.clone(),
                    detail: "no such CA certificate file".into(),
                });
            }
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some(prefix) = &self.inbox_prefix {
            opts = opts.custom_inbox_prefix(prefix);
        }
        Ok(opts)
    }
}

async fn credentials(path: &Path) -> Result<async_nats::ConnectOptions, BusError> {
    let bad = |detail: String| BusError::Credentials {
        path: path.to_path_buf(),
        detail,
    };
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| bad(e.to_string()))?;
    if text.contains("-----BEGIN NATS USER JWT-----") {
        return async_nats::ConnectOptions::new()
            .credentials_file(path)
            .await
            .map_err(|e| bad(e.to_string()));
    }
    let seed = text.trim();
    if !seed.starts_with("SU") || nkeys::KeyPair::from_seed(seed).is_err() {
        return Err(bad(
            "neither a user nkey seed (SU…) nor a .creds file".into()
        ));
    }
    Ok(async_nats::ConnectOptions::with_nkey(seed.to_owned()))
}

/// The command-line flags every berth process takes to reach NATS as its role.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NatsArgs {
    /// NATS credentials: an nkey seed file from `berth auth` (or a NATS `.creds` file).
    #[arg(long, global = true, env = "BERTH_NATS_CREDS", value_name = "FILE")]
    pub nats_creds: Option<PathBuf>,
    /// CA certificate (PEM) to trust for a `tls://` NATS URL; TLS is then required.
    #[arg(long, global = true, env = "BERTH_NATS_CA", value_name = "FILE")]
    pub nats_ca: Option<PathBuf>,
}

impl NatsArgs {
    /// Access for a process that sets the streams up only when it runs without credentials
    /// (as with a local server; under NATS roles only analyzers may).
    pub fn access(&self) -> Access {
        Access {
            creds: self.nats_creds.clone(),
            tls_ca: self.nats_ca.clone(),
            provision: self.nats_creds.is_none(),
            inbox_prefix: None,
        }
    }
}
