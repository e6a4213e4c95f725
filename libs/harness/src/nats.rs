//! A private NATS server with JetStream.

use crate::{
    HarnessError, binaries,
    process::{free_port, port_open, stop_child, wait_until},
};
use nix::sys::signal::Signal;
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
    /// A configuration file for the server (berth's NATS roles: `berth auth`).
    config: Option<PathBuf>,
    /// `--server_name`.
    name: String,
    /// Flags after the usual ones: a cluster node's ports and routes.
    extra: Vec<String>,
}

/// The server name of a server that is not in a cluster.
const SINGLE_NAME: &str = "berth-local";

impl NatsServer {
    /// Starts `nats-server` with JetStream storing under `dir`, on a free loopback port.
    pub fn start(dir: &Path) -> Result<NatsServer, HarnessError> {
        std::fs::create_dir_all(dir).map_err(|e| HarnessError::io(dir, e))?;
        NatsServer::start_with(dir, None)
    }

    /// Like [`NatsServer::start`], with `config` (e.g. the `authorization` block of
    /// `berth auth`) given to the server with `-c`.
    pub fn start_with(dir: &Path, config: Option<&Path>) -> Result<NatsServer, HarnessError> {
        std::fs::create_dir_all(dir).map_err(|e| HarnessError::io(dir, e))?;
        let mut server = NatsServer {
            child: None,
            dir: dir.to_path_buf(),
            port: 0,
            config: config.map(Path::to_path_buf),
            name: SINGLE_NAME.into(),
            extra: Vec::new(),
        };
        let mut last = None;
        // A free port can be taken by someone else before we bind it: try a few.
        for _ in 0..5 {
            server.port = free_port()?;
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(HarnessError::Failed {
            what: "nats-server".into(),
            detail: "no attempt made".into(),
        }))
    }

    /// Starts `nats-server` on a given port (for `berth up`, whose port is configured),
    /// with `config` if given.
    pub fn start_on(
        dir: &Path,
        port: u16,
        config: Option<&Path>,
    ) -> Result<NatsServer, HarnessError> {
        NatsServer::start_node(dir, port, config, SINGLE_NAME, Vec::new())
    }

    /// Starts `nats-server` on `port` as `name`, with `extra` flags after the usual ones
    /// (a cluster node's: they override what its configuration file says).
    pub(crate) fn start_node(
        dir: &Path,
        port: u16,
        config: Option<&Path>,
        name: &str,
        extra: Vec<String>,
    ) -> Result<NatsServer, HarnessError> {
        std::fs::create_dir_all(dir).map_err(|e| HarnessError::io(dir, e))?;
        let mut server = NatsServer {
            child: None,
            dir: dir.to_path_buf(),
            port,
            config: config.map(Path::to_path_buf),
            name: name.into(),
            extra,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), HarnessError> {
        let bin = binaries::find_nats_server()?;
        let log_path = self.dir.join("nats.log");
        // Appended to: a restarted server's log follows the one before it.
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| HarnessError::io(&log_path, e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| HarnessError::io(&log_path, e))?;
        let mut cmd = Command::new(&bin);
        if let Some(config) = &self.config {
            cmd.arg("-c").arg(config);
        }
        let mut child = cmd
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.join("jetstream"))
            .args(["--server_name", &self.name])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| HarnessError::io(&bin, e))?;
        let port = self.port;
        if let Err(e) = wait_until("nats-server", &mut child, Duration::from_secs(20), || {
            port_open(port)
        }) {
            stop_child(&mut child, Signal::SIGKILL, Duration::ZERO);
            let log = self.log();
            return Err(HarnessError::Failed {
                what: "nats-server".into(),
                detail: format!("{e}; log:\n{log}"),
            });
        }
        self.child = Some(child);
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id while it runs (benchmarks read its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// The server's name (`--server_name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server's log (every run of it, one after the other).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default()
    }

    /// Kills the server with SIGKILL, as a crash or a lost machine would: nothing is flushed
    /// or said to the cluster. Its data stays on disk for [`NatsServer::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Signal::SIGKILL, Duration::from_secs(10));
        }
    }

    /// Whether the server runs (it was started and not stopped or killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops the server (its JetStream data stays on disk).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Signal::SIGTERM, Duration::from_secs(10));
        }
    }

    /// Makes the server read its configuration again (new users from `berth auth`).
    pub fn reload(&self) -> Result<(), HarnessError> {
        let Some(child) = &self.child else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        nix::sys::signal::kill(pid, Signal::SIGHUP).map_err(|e| HarnessError::Failed {
            what: "nats-server reload".into(),
            detail: e.to_string(),
        })
    }

    /// Starts it again on the same port and data, after [`NatsServer::stop`].
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop();
        self.spawn()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
