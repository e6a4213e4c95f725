//! `berth keys`: API keys for the gateway, kept hashed in PostgreSQL.

use anyhow::{Context, Result, bail};
use berth_store::{
    Store,
    keys::{NewKey, Scope},
};
use clap::{Args, Subcommand};
use comfy_table::{Table, presets::NOTHING};

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCmd,
}

#[derive(Debug, Subcommand)]
enum KeysCmd {
    /// Make a key and print it, once: only its digest is kept.
    Create {
        /// A name to tell the key apart (unique among live keys).
        #[arg(value_parser = parse_name)]
        name: String,
        /// `inference` (the OpenAI-compatible /v1) or `admin` (everything).
        #[arg(long, value_parser = parse_scope)]
        scope: Scope,
    },
    /// The keys, live and revoked (never the keys themselves).
    List {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke the live key with this name; gateways refuse it within a second.
    Revoke { name: String },
}

fn parse_name(s: &str) -> Result<String, String> {
    berth_store::keys::validate_name(s)?;
    Ok(s.to_owned())
}

fn parse_scope(s: &str) -> Result<Scope, String> {
    s.parse()
}

pub async fn run(database_url: &str, args: KeysArgs) -> Result<()> {
    let store = Store::connect(database_url, 1)?;
    store.warm().await.with_context(|| {
        format!(
            "no database answered at {}",
            berth_store::connect::redacted(database_url)
        )
    })?;
    match args.command {
        KeysCmd::Create { name, scope } => {
            let key = NewKey::generate();
            store.create_key(&name, scope, &key).await?;
            eprintln!("key {name:?} ({scope}); it is shown only now:");
            println!("{}", key.secret);
        }
        KeysCmd::List { json } => {
            let keys = store.keys().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
                return Ok(());
            }
            let mut t = Table::new();
            t.load_style(NOTHING)
                .set_header(["NAME", "SCOPE", "KEY", "CREATED", "REVOKED"]);
            for k in keys {
                t.add_row([
                    k.name,
                    k.scope,
                    format!("{}…", k.prefix),
                    k.created_at.format("%Y-%m-%d %H:%M").to_string(),
                    k.revoked_at
                        .map(|r| r.format("%Y-%m-%d %H:%M").to_string())
                        .unwrap_or_default(),
                ]);
            }
            println!("{t}");
        }
        KeysCmd::Revoke { name } => {
            if !store.revoke_key(&name).await? {
                bail!("no live key named {name:?}");
            }
            println!("revoked {name:?}");
        }
    }
    Ok(())
}
