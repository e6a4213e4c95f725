//! NATS roles for berth: who may publish and subscribe where, as nats-server permissions,
//! and the directory `berth auth` keeps them in.
//!
//! - **analyzer**: berth's subjects and the JetStream API (it creates the streams).
//! - **publisher** (the CLI, the gateway, automation): publish commands, read events and
//!   history, ask agents for logs, look up the newest command and the dead letters.
//! - **agent** of one worker: its own status subject, its own consumer of `BERTH_AGENT`, and
//!   the requests for its worker (`berth.logs.<worker>`, `berth.rpc.<worker>`); replies only
//!   to what it was asked.
//!
//! The directory holds one nkey seed per user (`<user>.nk`, readable by its owner only),
//! `users.json` (who is who, public keys only) and `nats-auth.conf`, the `authorization`
//! block nats-server includes. Adding a user rewrites the block; nats-server reads it again
//! on `nats-server --signal reload` (or SIGHUP).

use crate::topology::{AGENT_STREAM, CMD_STREAM, DLQ_STREAM, EVENTS_STREAM};
use berth_proto::subjects;
use serde::{Deserialize, Serialize};
use std::{
    io::Write,
    path::{Path, PathBuf},
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Role {
    Analyzer,
    Publisher,
    Agent { worker: String },
}

/// Subjects a user may publish to and subscribe on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

impl Role {
    /// The user name for this role: `analyzer`, `agent-<worker>`; publishers are named.
    pub fn user(&self, name: &str) -> String {
        match self {
            Role::Analyzer => "analyzer".into(),
            Role::Publisher => name.into(),
            Role::Agent { worker } => format!("agent-{worker}"),
        }
    }

    /// Where replies to this role's requests go: an agent gets a prefix of its own, which its
    /// permissions allow and no other agent's do.
    pub fn inbox_prefix(&self) -> Option<String> {
        match self {
            Role::Agent { worker } => Some(format!("_INBOX.agent-{worker}")),
            _ => None,
        }
    }

    pub fn permissions(&self) -> Permissions {
        let own = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        match self {
            Role::Analyzer => Permissions {
                publish: own(&["berth.>", "$JS.>", "_INBOX.>"]),
                subscribe: own(&["berth.>", "$JS.>", "_INBOX.>"]),
            },
            Role::Publisher => {
                let mut publish = vec![
                    format!("{}.*", subjects::CMD_PREFIX),
                    format!("{}.*", subjects::LOGS_PREFIX),
                    format!("$JS.API.DIRECT.GET.{CMD_STREAM}.>"),
                    format!("$JS.API.DIRECT.GET.{CMD_STREAM}"),
                    format!("$JS.API.DIRECT.GET.{DLQ_STREAM}.>"),
                    format!("$JS.API.STREAM.MSG.GET.{DLQ_STREAM}"),
                ];
                for stream in [CMD_STREAM, DLQ_STREAM, EVENTS_STREAM] {
                    publish.push(format!("$JS.API.STREAM.INFO.{stream}"));
                }
                // `berth ps --explain` and the API read an instance's history through an
                // ephemeral consumer of the events stream.
                for api in ["CREATE", "INFO", "DELETE", "MSG.NEXT"] {
                    publish.push(format!("$JS.API.CONSUMER.{api}.{EVENTS_STREAM}"));
                    publish.push(format!("$JS.API.CONSUMER.{api}.{EVENTS_STREAM}.>"));
                }
                Permissions {
                    publish,
                    subscribe: vec![
                        format!("{}.*", subjects::EVENTS_PREFIX),
                        "berth.analyzers.>".into(),
                        "_INBOX.>".into(),
                    ],
                }
            }
            Role::Agent { worker } => {
                let durable = format!("agent-{worker}");
                let consumer =
                    |api: &str| format!("$JS.API.CONSUMER.{api}.{AGENT_STREAM}.{durable}");
                Permissions {
                    publish: vec![
                        format!("{}.{worker}", subjects::STATUS_PREFIX),
                        // A leader asks its followers where their RPC servers listen.
                        "berth.rpc.*".into(),
                        consumer("CREATE"),
                        format!("{}.>", consumer("CREATE")),
                        consumer("DURABLE.CREATE"),
                        consumer("INFO"),
                        consumer("MSG.NEXT"),
                        format!("$JS.ACK.{AGENT_STREAM}.{durable}.>"),
                    ],
                    subscribe: vec![
                        format!("{}.{worker}", subjects::LOGS_PREFIX),
                        format!("berth.rpc.{worker}"),
                        format!("_INBOX.agent-{worker}.>"),
                    ],
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("bad name {name:?}: {detail}")]
    BadName { name: String, detail: String },
    #[error("cannot make a key: {0}")]
    Key(String),
}

/// One user, as `users.json` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub user: String,
    #[serde(flatten)]
    pub role: Role,
    pub public_key: String,
}

/// A directory of NATS credentials for one fleet.
#[derive(Debug, Clone)]
pub struct AuthDir {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuthError + '_ {
    move |source| AuthError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl AuthDir {
    pub fn new(dir: impl Into<PathBuf>) -> AuthDir {
        AuthDir { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The seed file of `user`.
    pub fn creds(&self, user: &str) -> PathBuf {
        self.dir.join(format!("{user}.nk"))
    }

    /// The `authorization` block for nats-server (`include` it, or pass it with `-c`).
    pub fn server_config(&self) -> PathBuf {
        self.dir.join("nats-auth.conf")
    }

    fn users_file(&self) -> PathBuf {
        self.dir.join("users.json")
    }

    pub fn users(&self) -> Result<Vec<User>, AuthError> {
        let path = self.users_file();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AuthError::Corrupt {
                path,
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// The CA certificate clients trust when NATS serves TLS from this directory.
    pub fn ca(&self) -> Option<PathBuf> {
        let ca = self.dir.join("nats-ca.pem");
        ca.is_file().then_some(ca)
    }

    /// Makes a CA (`nats-ca.pem`) and a server certificate for `hosts` signed by it
    /// (`nats-server.pem`, key `nats-server-key.pem`, owner only), and has the server's
    /// configuration serve TLS with them. The CA's key is not kept: a new host means new
    /// certificates (run it again).
    pub fn enable_tls(&self, hosts: &[String]) -> Result<(), AuthError> {
        let tls = certificates(hosts)?;
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        write_private(&self.dir.join("nats-server-key.pem"), tls.key.as_bytes())?;
        write_atomic(&self.dir.join("nats-server.pem"), tls.cert.as_bytes())?;
        write_atomic(&self.dir.join("nats-ca.pem"), tls.ca.as_bytes())?;
        self.write_config(&self.users()?)
    }

    fn write_config(&self, users: &[User]) -> Result<(), AuthError> {
        let mut conf = render(users);
        if self.ca().is_some() {
            let q =
                |name: &str| serde_json::Value::String(self.dir.join(name).display().to_string());
            conf.push_str(&format!(
                "tls {{\n  cert_file: {}\n  key_file: {}\n}}\n",
                q("nats-server.pem"),
                q("nats-server-key.pem")
            ));
        }
        write_atomic(&self.server_config(), conf.as_bytes())
    }

    /// Makes the directory with an analyzer and a `publisher`, unless they exist.
    pub fn init(&self) -> Result<(), AuthError> {
        self.add(Role::Analyzer, "analyzer")?;
        self.add(Role::Publisher, "publisher")?;
        Ok(())
    }

    /// Adds `role` under `name` (for publishers; others are named by their role) unless that
    /// user exists; returns its seed file. Rewrites the server's block.
    pub fn add(&self, role: Role, name: &str) -> Result<PathBuf, AuthError> {
        if let Role::Agent { worker } = &role {
            subjects::validate_id(worker).map_err(|e| AuthError::BadName {
                name: worker.clone(),
                detail: e.to_string(),
            })?;
        }
        let user = role.user(name);
        subjects::validate_id(&user).map_err(|e| AuthError::BadName {
            name: user.clone(),
            detail: e.to_string(),
        })?;
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let mut users = self.users()?;
        let seed_path = self.creds(&user);
        if users.iter().any(|u| u.user == user) && seed_path.is_file() {
            return Ok(seed_path);
        }
        let key = nkeys::KeyPair::new_user();
        let seed = key.seed().map_err(|e| AuthError::Key(e.to_string()))?;
        write_private(&seed_path, seed.as_bytes())?;
        users.retain(|u| u.user != user);
        users.push(User {
            user,
            role,
            public_key: key.public_key(),
        });
        let json = serde_json::to_vec_pretty(&users).map_err(|e| AuthError::Corrupt {
            path: self.users_file(),
            detail: e.to_string(),
        })?;
        write_atomic(&self.users_file(), &json)?;
        self.write_config(&users)?;
        Ok(seed_path)
    }
}

/// A new CA and a server certificate signed by it, as PEM.
#[derive(Clone)]
pub struct Certificates {
    /// What clients trust.
    pub ca: String,
    /// The server's certificate, for `hosts`.
    pub cert: String,
    /// The server's private key.
    pub key: String,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates").finish_non_exhaustive()
    }
}

/// Makes a CA (whose key is dropped: no more certificates come from it) and a server
/// certificate for `hosts` (names or addresses) signed by it.
pub fn certificates(hosts: &[String]) -> Result<Certificates, AuthError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let tls = |e: rcgen::Error| AuthError::Key(e.to_string());
    if hosts.is_empty() {
        return Err(AuthError::BadName {
            name: String::new(),
            detail: "TLS needs at least one host name or address".into(),
        });
    }
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "berth CA");
    let ca_key = KeyPair::generate().map_err(tls)?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(tls)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let mut server_params = CertificateParams::new(hosts.to_vec()).map_err(tls)?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "berth server");
    let server_key = KeyPair::generate().map_err(tls)?;
    let server_cert = server_params.signed_by(&server_key, &issuer).map_err(tls)?;
    Ok(Certificates {
        ca: ca_cert.pem(),
        cert: server_cert.pem(),
        key: server_key.serialize_pem(),
    })
}

/// The `authorization` block for `users`.
pub fn render(users: &[User]) -> String {
    let list = |v: &[String]| {
        v.iter()
            .map(|s| serde_json::Value::String(s.clone()).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::from(
        "# Written by `berth auth`; edit with it, not by hand.\nauthorization {\n  users = [\n",
    );
    for u in users {
        let p = u.role.permissions();
        out.push_str(&format!(
            "    # {}\n    {{ nkey: \"{}\", permissions: {{ publish: {{ allow: [{}] }}, subscribe: {{ allow: [{}] }}, allow_responses: true }} }}\n",
            u.user,
            u.public_key,
            list(&p.publish),
            list(&p.subscribe)
        ));
    }
    out.push_str("  ]\n}\n");
    out
}

/// Writes a secret to `path` (replacing what was there), readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AuthError> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AuthError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_may_only_touch_its_own_worker() {
        let p = Role::Agent {
            worker: "w1".into(),
        }
        .permissions();
        assert!(p.publish.contains(&"berth.status.w1".to_owned()));
        assert!(!p.publish.iter().any(|s| s.contains("w2") || s == "berth.>"));
        assert!(!p.publish.iter().any(|s| s.starts_with("berth.cmd")));
        assert!(p.subscribe.iter().all(|s| s.contains("w1")));
    }

    #[test]
    fn a_publisher_cannot_speak_for_agents_or_analyzers() {
        let p = Role::Publisher.permissions();
        for s in &p.publish {
            assert!(
                !s.starts_with("berth.status")
                    && !s.starts_with("berth.agent")
                    && !s.starts_with("berth.events")
                    && !s.contains("STREAM.CREATE")
                    && !s.contains("STREAM.DELETE"),
                "{s}"
            );
        }
    }

    #[test]
    fn the_directory_keeps_seeds_private_and_adding_twice_changes_nothing() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let auth = AuthDir::new(dir.path().join("auth"));
        auth.init().unwrap();
        let agent = Role::Agent {
            worker: "w1".into(),
        };
        let seed = auth.add(agent.clone(), "").unwrap();
        let first = std::fs::read_to_string(&seed).unwrap();
        assert!(first.starts_with("SU"));
        assert_eq!(
            std::fs::metadata(&seed).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(auth.add(agent, "").unwrap(), seed);
        assert_eq!(std::fs::read_to_string(&seed).unwrap(), first);
        let users = auth.users().unwrap();
        assert_eq!(
            users.iter().map(|u| u.user.as_str()).collect::<Vec<_>>(),
            ["analyzer", "publisher", "agent-w1"]
        );
        let conf = std::fs::read_to_string(auth.server_config()).unwrap();
        for u in &users {
            assert!(conf.contains(&u.public_key), "{conf}");
        }
        assert!(!conf.contains(first.trim()), "no seed in the server's file");
        assert!(
            auth.add(
                Role::Agent {
                    worker: "a.b".into()
                },
                ""
            )
            .is_err()
        );
    }
}
