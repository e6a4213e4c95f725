//! How a process proves who it is to NATS, and how it reaches it: an nkey seed file (the
//! role's credentials, made by `berth auth`), TLS with a trusted CA, and whether it sets up
//! the streams (only analyzers may, once NATS permissions are on), with how many copies.

use crate::BusError;
use async_nats::ServerAddr;
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
    /// How many copies of each stream JetStream keeps, when this process sets them up.
    pub replicas: Replicas,
}

impl Default for Access {
    /// No credentials, no TLS, and the streams set up with replicas for the server found.
    fn default() -> Access {
        Access {
            creds: None,
            tls_ca: None,
            provision: true,
            inbox_prefix: None,
            replicas: Replicas::Auto,
        }
    }
}

/// How many servers keep a copy of each of berth's streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Replicas {
    /// Three on a cluster (the server says it is in one), one on a single server.
    #[default]
    Auto,
    /// This many (1 to 5; a cluster needs at least as many JetStream servers).
    Fixed(usize),
}

/// The replicas [`Replicas::Auto`] chooses on a cluster: any one server may be lost.
pub const CLUSTER_REPLICAS: usize = 3;

impl Replicas {
    /// The number for a server that says whether it is in a cluster.
    pub fn resolve(self, clustered: bool) -> usize {
        match self {
            Replicas::Fixed(n) => n,
            Replicas::Auto if clustered => CLUSTER_REPLICAS,
            Replicas::Auto => 1,
        }
    }
}

impl std::str::FromStr for Replicas {
    type Err = String;

    fn from_str(s: &str) -> Result<Replicas, String> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Replicas::Auto);
        }
        match s.parse::<usize>() {
            // JetStream's own bounds.
            Ok(n @ 1..=5) => Ok(Replicas::Fixed(n)),
            _ => Err(format!("{s:?}: expected `auto` or 1 to 5")),
        }
    }
}

/// The servers of a comma-separated list of NATS URLs (`nats://a:4222,nats://b:4222`): a
/// client connects to any of them and moves to another when its server goes away.
pub fn server_addrs(urls: &str) -> Result<Vec<ServerAddr>, BusError> {
    let bad = |detail: String| BusError::Url {
        urls: urls.to_owned(),
        detail,
    };
    let addrs = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<ServerAddr>()
                .map_err(|e| bad(format!("{u:?}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err(bad("no server URL".into()));
    }
    Ok(addrs)
}

impl Access {
    /// For a process that only uses the streams.
    pub fn user(creds: Option<PathBuf>, tls_ca: Option<PathBuf>) -> Access {
        Access {
            creds,
            tls_ca,
            provision: false,
            ..Access::default()
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
    /// Copies of each stream when this process sets them up: `auto` (3 on a NATS cluster,
    /// 1 on a single server) or 1 to 5.
    #[arg(
        long,
        global = true,
        env = "BERTH_NATS_REPLICAS",
        value_name = "N",
        default_value = "auto"
    )]
    pub nats_replicas: Replicas,
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
            replicas: self.nats_replicas,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_of_urls_is_every_server_in_it() {
        let addrs = server_addrs("nats://a:4222, nats://b:4223,nats://c:4224").unwrap();
        let hosts: Vec<(String, u16)> = addrs
            .iter()
            .map(|a| (a.host().to_owned(), a.port()))
            .collect();
        assert_eq!(
            hosts,
            [("a".into(), 4222), ("b".into(), 4223), ("c".into(), 4224)]
        );
        assert_eq!(server_addrs("nats://127.0.0.1:4222").unwrap().len(), 1);
        assert!(server_addrs(" , ").is_err());
        assert!(server_addrs("nats://a:4222,http://b").is_err());
    }

    #[test]
    fn auto_replicas_are_three_on_a_cluster_and_one_alone() {
        assert_eq!(Replicas::Auto.resolve(true), 3);
        assert_eq!(Replicas::Auto.resolve(false), 1);
        assert_eq!("2".parse::<Replicas>().unwrap().resolve(true), 2);
        assert_eq!("auto".parse::<Replicas>().unwrap(), Replicas::Auto);
        assert!("0".parse::<Replicas>().is_err());
        assert!("6".parse::<Replicas>().is_err());
    }
}
