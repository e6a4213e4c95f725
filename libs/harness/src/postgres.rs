//! A private PostgreSQL cluster: `initdb` on first start, then `postgres` on a loopback port.

use crate::{
    HarnessError, binaries,
    process::{free_port, stop_child, wait_until},
};
use nix::{sys::signal::Signal, unistd::User};
use std::{
    fs::File,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

/// Whether the cluster may trade crash safety for speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync off: for tests and benchmarks, whose data is thrown away.
    Fast,
    /// PostgreSQL's defaults: for `berth up`, whose data stays under `.berth/`.
    Safe,
}

#[derive(Debug)]
pub struct PgServer {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
    durability: Durability,
    owner: Option<User>,
    /// The `postgres` role's password once connections over TCP need one.
    password: Option<String>,
    /// Serves TLS with `server.crt` / `server.key` in its data directory.
    tls: bool,
}

impl PgServer {
    /// Starts a cluster in `dir` (created with `initdb` if new) on a free loopback port.
    pub fn start(dir: &Path, durability: Durability) -> Result<PgServer, HarnessError> {
        let mut last = None;
        for _ in 0..5 {
            match Self::start_on(dir, free_port()?, durability) {
                Ok(pg) => return Ok(pg),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(HarnessError::Failed {
            what: "postgres".into(),
            detail: "no attempt made".into(),
        }))
    }

    /// Starts a cluster in `dir` on `port`.
    pub fn start_on(
        dir: &Path,
        port: u16,
        durability: Durability,
    ) -> Result<PgServer, HarnessError> {
        let owner = service_user()?;
        std::fs::create_dir_all(dir.join("sock")).map_err(|e| HarnessError::io(dir, e))?;
        if let Some(user) = &owner {
            for path in [dir.to_path_buf(), dir.join("sock")] {
                std::os::unix::fs::chown(&path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                    .map_err(|e| HarnessError::io(&path, e))?;
            }
        }
        let mut server = PgServer {
            child: None,
            dir: dir.to_path_buf(),
            port,
            durability,
            owner,
            password: None,
            tls: false,
        };
        if !dir.join("data/PG_VERSION").is_file() {
            server.initdb()?;
        }
        server.spawn()?;
        Ok(server)
    }

    fn command(&self, program: &str) -> Result<Command, HarnessError> {
        let mut cmd = Command::new(binaries::find_pg_bin()?.join(program));
        if let Some(user) = &self.owner {
            cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        cmd.stdin(Stdio::null());
        Ok(cmd)
    }

    fn log(&self, name: &str) -> Result<(File, File, PathBuf), HarnessError> {
        let path = self.dir.join(name);
        let f = File::create(&path).map_err(|e| HarnessError::io(&path, e))?;
        let g = f.try_clone().map_err(|e| HarnessError::io(&path, e))?;
        Ok((f, g, path))
    }

    fn initdb(&self) -> Result<(), HarnessError> {
        let (out, err, log_path) = self.log("initdb.log")?;
        let status = self
            .command("initdb")?
            .arg("-D")
            .arg(self.dir.join("data"))
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdout(out)
            .stderr(err)
            .status()
            .map_err(|e| HarnessError::io("initdb", e))?;
        if !status.success() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(HarnessError::Failed {
                what: "initdb".into(),
                detail: format!("{status}; log:\n{log}"),
            });
        }
        Ok(())
    }

    fn spawn(&mut self) -> Result<(), HarnessError> {
        let (out, err, log_path) = self.log("postgres.log")?;
        let mut cmd = self.command("postgres")?;
        cmd.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.join("sock"))
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=300",
            ]);
        // Profiling: `berth bench place` prints the top statements when this is set.
        if std::env::var_os("BERTH_PG_STATEMENT_STATS").is_some() {
            cmd.args(["-c", "shared_preload_libraries=pg_stat_statements"])
                .args(["-c", "pg_stat_statements.track=all"]);
        }
        // Profiling: extra server settings, `name=value` separated by spaces (for example
        // `BERTH_PG_SETTINGS="shared_preload_libraries=auto_explain auto_explain.log_min_duration=0"`).
        if let Ok(settings) = std::env::var("BERTH_PG_SETTINGS") {
            for setting in settings.split_whitespace() {
                cmd.args(["-c", setting]);
            }
        }
        if self.tls {
            cmd.args(["-c", "ssl=on", "-c", "ssl_cert_file=server.crt"])
                .args(["-c", "ssl_key_file=server.key"]);
        }
        if self.durability == Durability::Fast {
            cmd.args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off"]);
        }
        let mut child = cmd
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| HarnessError::io("postgres", e))?;
        let pid_file = self.dir.join("data/postmaster.pid");
        // The 8th line of postmaster.pid turns to "ready" once connections are accepted.
        let ready = || {
            std::fs::read_to_string(&pid_file)
                .map(|t| t.lines().nth(7).is_some_and(|l| l.trim() == "ready"))
                .unwrap_or(false)
        };
        if let Err(e) = wait_until("postgres", &mut child, Duration::from_secs(30), ready) {
            stop_child(&mut child, Signal::SIGKILL, Duration::ZERO);
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(HarnessError::Failed {
                what: "postgres".into(),
                detail: format!("{e}; log:\n{log}"),
            });
        }
        self.child = Some(child);
        Ok(())
    }

    /// A connection URL for the `postgres` database as the `postgres` superuser (with its
    /// password, once [`PgServer::require_password`] set one).
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("postgres://postgres:{p}@127.0.0.1:{}/postgres", self.port),
            None => format!("postgres://postgres@127.0.0.1:{}/postgres", self.port),
        }
    }

    /// Serves TLS from now on with this certificate chain and key (PEM), after a restart.
    pub fn enable_tls(&mut self, cert_pem: &str, key_pem: &str) -> Result<(), HarnessError> {
        use std::os::unix::fs::OpenOptionsExt;
        for (name, text, mode) in [
            ("server.crt", cert_pem, 0o644),
            ("server.key", key_pem, 0o600),
        ] {
            let path = self.dir.join("data").join(name);
            let _ = std::fs::remove_file(&path);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)
                .map_err(|e| HarnessError::io(&path, e))?;
            std::io::Write::write_all(&mut f, text.as_bytes())
                .map_err(|e| HarnessError::io(&path, e))?;
            if let Some(user) = &self.owner {
                std::os::unix::fs::chown(&path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                    .map_err(|e| HarnessError::io(&path, e))?;
            }
        }
        self.tls = true;
        self.restart()
    }

    /// From now on connections over TCP authenticate with SCRAM-SHA-256 and `password` (the
    /// `postgres` role's, set here). Only the server's own socket directory, which nobody
    /// but its owner can enter, still connects without one: that is how the password is set,
    /// also on a cluster made before with `trust`, or when the password was lost.
    pub fn require_password(&mut self, password: &str) -> Result<(), HarnessError> {
        if password.is_empty() || !password.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(HarnessError::Failed {
                what: "postgres password".into(),
                detail: "letters and digits only, at least one".into(),
            });
        }
        let sock = self.dir.join("sock");
        let mut perms = std::fs::metadata(&sock)
            .map_err(|e| HarnessError::io(&sock, e))?
            .permissions();
        perms.set_mode(0o700);
        std::fs::set_permissions(&sock, perms).map_err(|e| HarnessError::io(&sock, e))?;
        let (out, err, log_path) = self.log("password.log")?;
        let status = self
            .command("psql")?
            .arg("-h")
            .arg(&sock)
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres"])
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-c"])
            .arg(format!(
                "SET password_encryption = 'scram-sha-256'; ALTER ROLE postgres PASSWORD '{password}'"
            ))
            .stdout(out)
            .stderr(err)
            .status()
            .map_err(|e| HarnessError::io("psql", e))?;
        if !status.success() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(HarnessError::Failed {
                what: "setting the postgres password".into(),
                detail: format!("{status}; log:\n{log}"),
            });
        }
        let hba = self.dir.join("data/pg_hba.conf");
        std::fs::write(
            &hba,
            "# Written by berth: the socket directory is its owner's alone; TCP needs a password.\n\
             local all all trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n\
             host all all ::1/128 scram-sha-256\n",
        )
        .map_err(|e| HarnessError::io(&hba, e))?;
        if let Some(child) = &self.child {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
            nix::sys::signal::kill(pid, Signal::SIGHUP).map_err(|e| HarnessError::Failed {
                what: "postgres reload".into(),
                detail: e.to_string(),
            })?;
        }
        self.password = Some(password.to_owned());
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id while it runs (benchmarks read its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Stops the server with a fast shutdown (data stays).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Signal::SIGINT, Duration::from_secs(20));
        }
    }

    /// Starts it again on the same port and data, after [`PgServer::stop`].
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop();
        self.spawn()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The user to run PostgreSQL as: `postgres` when we are root (it refuses to run as root),
/// ourselves otherwise.
fn service_user() -> Result<Option<User>, HarnessError> {
    if !nix::unistd::Uid::effective().is_root() {
        return Ok(None);
    }
    match User::from_name("postgres") {
        Ok(Some(user)) => Ok(Some(user)),
        _ => Err(HarnessError::Missing {
            what: "user 'postgres'",
            hint: "PostgreSQL cannot run as root; run ops/setup.sh to create the user".into(),
        }),
    }
}

/// Lets the `postgres` user reach a directory inside a private (0700) temporary directory.
pub(crate) fn open_for_service_user(dir: &Path) -> Result<(), HarnessError> {
    let mut perms = std::fs::metadata(dir)
        .map_err(|e| HarnessError::io(dir, e))?
        .permissions();
    perms.set_mode(0o755);
    std::fs::set_permissions(dir, perms).map_err(|e| HarnessError::io(dir, e))
}
