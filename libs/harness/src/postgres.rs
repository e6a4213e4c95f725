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
    /// Server settings (`name=value`) given after every other, so they win: a replicating
    /// pair's (see [`crate::PgPair`]).
    settings: Vec<String>,
}

impl PgServer {
    /// Starts a cluster in `dir` (created with `initdb` if new) on a free loopback port.
    pub fn start(dir: &Path, durability: Durability) -> Result<PgServer, HarnessError> {
        Self::start_with_settings(dir, durability, &[])
    }

    /// Like [`PgServer::start`], with server settings that win over the durability's.
    pub(crate) fn start_with_settings(
        dir: &Path,
        durability: Durability,
        settings: &[String],
    ) -> Result<PgServer, HarnessError> {
        let mut last = None;
        for _ in 0..5 {
            match Self::start_configured(dir, free_port()?, durability, settings.to_vec()) {
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
        Self::start_configured(dir, port, durability, Vec::new())
    }

    fn start_configured(
        dir: &Path,
        port: u16,
        durability: Durability,
        settings: Vec<String>,
    ) -> Result<PgServer, HarnessError> {
        let mut server = Self::prepare(dir, port, durability, settings)?;
        if !dir.join("data/PG_VERSION").is_file() {
            server.initdb()?;
        }
        server.spawn()?;
        Ok(server)
    }

    /// The handle of a cluster in `dir`, its directories made and owned by the service
    /// user; nothing started.
    fn prepare(
        dir: &Path,
        port: u16,
        durability: Durability,
        settings: Vec<String>,
    ) -> Result<PgServer, HarnessError> {
        let owner = service_user()?;
        std::fs::create_dir_all(dir.join("sock")).map_err(|e| HarnessError::io(dir, e))?;
        if let Some(user) = &owner {
            for path in [dir.to_path_buf(), dir.join("sock")] {
                std::os::unix::fs::chown(&path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                    .map_err(|e| HarnessError::io(&path, e))?;
            }
        }
        Ok(PgServer {
            child: None,
            dir: dir.to_path_buf(),
            port,
            durability,
            owner,
            password: None,
            tls: false,
            settings,
        })
    }

    /// A hot standby of `primary` in `dir`: a base backup of it (through its socket
    /// directory), then a server that streams from it under the name `application_name`
    /// and its own replication slot, on a free loopback port. `settings` as for
    /// [`PgServer::start_with_settings`].
    pub(crate) fn start_standby(
        primary: &PgServer,
        dir: &Path,
        application_name: &str,
        settings: Vec<String>,
    ) -> Result<PgServer, HarnessError> {
        let conninfo = format!(
            "host={} port={} user=postgres application_name={application_name}",
            primary.sock_dir().display(),
            primary.port
        );
        let mut settings = settings;
        settings.push(format!("primary_conninfo={conninfo}"));
        settings.push(format!("primary_slot_name={application_name}"));
        let mut server = Self::prepare(dir, free_port()?, primary.durability, settings)?;
        let (out, err, log_path) = server.log("basebackup.log")?;
        let status = server
            .command("pg_basebackup")?
            .arg("-D")
            .arg(dir.join("data"))
            .arg("-h")
            .arg(primary.sock_dir())
            .args(["-p", &primary.port.to_string(), "-U", "postgres"])
            // A fast checkpoint: the default spreads it over minutes.
            .args(["--checkpoint=fast", "--wal-method=stream", "--no-sync"])
            .args(["--create-slot", "--slot", application_name])
            .stdout(out)
            .stderr(err)
            .status()
            .map_err(|e| HarnessError::io("pg_basebackup", e))?;
        if !status.success() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(HarnessError::Failed {
                what: "pg_basebackup".into(),
                detail: format!("{status}; log:\n{log}"),
            });
        }
        let signal = dir.join("data/standby.signal");
        File::create(&signal).map_err(|e| HarnessError::io(&signal, e))?;
        if let Some(user) = &server.owner {
            std::os::unix::fs::chown(&signal, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                .map_err(|e| HarnessError::io(&signal, e))?;
        }
        let mut last = None;
        // A free port can be taken by someone else before the server binds it.
        for _ in 0..5 {
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
            server.port = free_port()?;
        }
        Err(last.unwrap_or(HarnessError::Failed {
            what: "standby".into(),
            detail: "no attempt made".into(),
        }))
    }

    /// Where the server's Unix socket is (only its owner may enter once a password is
    /// required).
    pub(crate) fn sock_dir(&self) -> PathBuf {
        self.dir.join("sock")
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
        // Last, so they win: of settings given twice, PostgreSQL keeps the later.
        for setting in &self.settings {
            cmd.arg("-c").arg(setting);
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
    /// also on a cluster made before with `trust`, or when the password was lost (and how a
    /// standby of it replicates).
    pub fn require_password(&mut self, password: &str) -> Result<(), HarnessError> {
        check_password(password)?;
        self.close_socket_dir()?;
        self.query(&format!(
            "SET password_encryption = 'scram-sha-256'; ALTER ROLE postgres PASSWORD '{password}'"
        ))
        .map_err(|e| HarnessError::Failed {
            what: "setting the postgres password".into(),
            detail: e.to_string(),
        })?;
        self.require_scram(password)
    }

    /// The socket directory becomes its owner's alone.
    fn close_socket_dir(&self) -> Result<(), HarnessError> {
        let sock = self.sock_dir();
        let mut perms = std::fs::metadata(&sock)
            .map_err(|e| HarnessError::io(&sock, e))?
            .permissions();
        perms.set_mode(0o700);
        std::fs::set_permissions(&sock, perms).map_err(|e| HarnessError::io(&sock, e))
    }

    /// Asks TCP connections for the password the `postgres` role has (set on the primary,
    /// replicated to a standby) and reloads.
    pub(crate) fn require_scram(&mut self, password: &str) -> Result<(), HarnessError> {
        check_password(password)?;
        self.close_socket_dir()?;
        let hba = self.dir.join("data/pg_hba.conf");
        std::fs::write(
            &hba,
            "# Written by berth: the socket directory is its owner's alone; TCP needs a password.\n\
             local all all trust\n\
             local replication all trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n\
             host all all ::1/128 scram-sha-256\n",
        )
        .map_err(|e| HarnessError::io(&hba, e))?;
        if let Some(pid) = self.pid() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
            nix::sys::signal::kill(pid, Signal::SIGHUP).map_err(|e| HarnessError::Failed {
                what: "postgres reload".into(),
                detail: e.to_string(),
            })?;
        }
        self.password = Some(password.to_owned());
        Ok(())
    }

    /// Runs `sql` with `psql` through the server's socket as `postgres` and returns what it
    /// printed (unaligned, tuples only: `t`, `sync`, `1|2`), trimmed. For the harness's own
    /// look at a server and for tests; berth itself never shells out.
    pub fn query(&self, sql: &str) -> Result<String, HarnessError> {
        let output = self
            .command("psql")?
            .current_dir(&self.dir)
            .arg("-h")
            .arg(self.sock_dir())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .map_err(|e| HarnessError::io("psql", e))?;
        if !output.status.success() {
            return Err(HarnessError::Failed {
                what: format!("psql -c {sql:?}"),
                detail: format!(
                    "{}: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Whether the server runs and takes writes (a primary, or a standby once promoted).
    pub fn accepts_writes(&self) -> bool {
        self.child.is_some()
            && self
                .query("SELECT NOT pg_is_in_recovery()")
                .is_ok_and(|t| t == "t")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id while it runs (benchmarks read its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Kills the server as a crash of its machine would: SIGKILL to the postmaster and to
    /// every backend, so none of them answers or finishes anything afterwards. The data
    /// stays, as a crash leaves it.
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let Ok(raw) = i32::try_from(child.id()) else {
            let _ = child.kill();
            let _ = child.wait();
            return;
        };
        let postmaster = nix::unistd::Pid::from_raw(raw);
        // Stopped first, it forks no new backend while they are being found and killed.
        let _ = nix::sys::signal::kill(postmaster, Signal::SIGSTOP);
        for backend in children_of(raw) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(backend), Signal::SIGKILL);
        }
        let _ = child.kill();
        let _ = child.wait();
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

/// A password `require_password` can put in a URL and in SQL as it is.
fn check_password(password: &str) -> Result<(), HarnessError> {
    if password.is_empty() || !password.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(HarnessError::Failed {
            what: "postgres password".into(),
            detail: "letters and digits only, at least one".into(),
        });
    }
    Ok(())
}

/// The processes whose parent is `pid` (from `/proc/*/stat`: the parent is the field after
/// the state, which follows the parenthesised command name).
pub(crate) fn children_of(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|stat| {
                    let after = stat.rsplit_once(')')?.1;
                    after.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Lets the `postgres` user reach a directory inside a private (0700) temporary directory.
pub(crate) fn open_for_service_user(dir: &Path) -> Result<(), HarnessError> {
    let mut perms = std::fs::metadata(dir)
        .map_err(|e| HarnessError::io(dir, e))?
        .permissions();
    perms.set_mode(0o755);
    std::fs::set_permissions(dir, perms).map_err(|e| HarnessError::io(dir, e))
}
