//! `berth auth`: NATS credentials for each part of a fleet (roles enforced by nats-server).

use anyhow::Result;
use berth_bus::auth::{AuthDir, Role};
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct AuthArgs {
    /// Where the credentials and the server's `authorization` block are kept.
    #[arg(long, global = true, default_value = ".berth/auth")]
    dir: PathBuf,
    #[command(subcommand)]
    command: AuthCmd,
}

#[derive(Debug, Subcommand)]
enum AuthCmd {
    /// Make the directory with the analyzer and a `publisher` user (kept if they exist).
    Init {
        /// Also make a CA and a server certificate for these names or addresses, and have
        /// the server serve TLS (clients then take --nats-ca DIR/nats-ca.pem).
        #[arg(long = "tls-host", value_name = "HOST")]
        tls_hosts: Vec<String>,
        /// Also add the agent of this worker (repeatable): one command makes every
        /// credential a fleet needs (`docker-compose.yml`: `--agent gpu-a --agent gpu-b`).
        #[arg(long = "agent", value_name = "WORKER")]
        agents: Vec<String>,
    },
    /// Add the agent of WORKER: it may use only that worker's subjects.
    AddAgent { worker: String },
    /// Add a publisher (commands, events, logs): for a person, a gateway, a script.
    AddPublisher { name: String },
    /// The users, their roles and public keys (never the seeds).
    List,
}

pub fn run(args: &AuthArgs) -> Result<()> {
    let auth = AuthDir::new(&args.dir);
    let added = match &args.command {
        AuthCmd::Init { tls_hosts, agents } => {
            auth.init()?;
            for worker in agents {
                let seed = auth.add(
                    Role::Agent {
                        worker: worker.clone(),
                    },
                    "",
                )?;
                println!("credentials: {} (agent of {worker})", seed.display());
            }
            if !tls_hosts.is_empty() {
                auth.enable_tls(tls_hosts)?;
                if let Some(ca) = auth.ca() {
                    println!("TLS: clients trust {} (--nats-ca)", ca.display());
                }
            }
            None
        }
        AuthCmd::AddAgent { worker } => Some(auth.add(
            Role::Agent {
                worker: worker.clone(),
            },
            "",
        )?),
        AuthCmd::AddPublisher { name } => Some(auth.add(Role::Publisher, name)?),
        AuthCmd::List => {
            for u in auth.users()? {
                let role = match &u.role {
                    Role::Analyzer => "analyzer".to_owned(),
                    Role::Publisher => "publisher".to_owned(),
                    Role::Agent { worker } => format!("agent of {worker}"),
                };
                println!("{:<24} {:<20} {}", u.user, role, u.public_key);
            }
            return Ok(());
        }
    };
    if let Some(seed) = added {
        println!(
            "credentials: {} (give it with --nats-creds)",
            seed.display()
        );
    }
    println!(
        "nats-server configuration: {} (run the server with -c, or `include` it; after a \
         change, `nats-server --signal reload` or SIGHUP)",
        auth.server_config().display()
    );
    Ok(())
}
