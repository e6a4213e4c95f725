//! Connections and migrations.

use crate::StoreError;
use diesel_async::{
    AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection,
    pooled_connection::{
        AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
        deadpool::{Object, Pool},
    },
};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures::future::BoxFuture;

/// The SQL under `migrations/`, compiled into every binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations");

/// Arbitrary constant: the advisory lock that serializes concurrent migration runs.
const MIGRATION_LOCK: i64 = 0x6265_7274_685f_6d67; // "berth_mg"

/// A pool of connections to berth's database.
#[derive(Clone)]
pub struct Store {
    /// For the statements on the placement path: key lookups with fixed plans ([`setup`]).
    pool: Pool<AsyncPgConnection>,
    /// For the few queries that read a whole table (capacity loads, the sweeper, `ps`), with
    /// the planner's defaults, so that they may scan.
    scans: Pool<AsyncPgConnection>,
}

/// Connections in the pool for whole-table reads: they are rare (every second at most).
const SCAN_CONNECTIONS: usize = 2;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("status", &self.pool.status())
            .finish()
    }
}

impl Store {
    /// A pool of at most `max_size` connections for the placement path, and a small one for
    /// whole-table reads; connections are made lazily.
    pub fn connect(url: &str, max_size: usize) -> Result<Store, StoreError> {
        Ok(Store {
            pool: pool(url, max_size.max(1), |url| Box::pin(setup(url.to_owned())))?,
            scans: pool(url, SCAN_CONNECTIONS, |url| {
                let url = url.to_owned();
                Box::pin(async move { crate::connect::establish(&url).await })
            })?,
        })
    }

    pub(crate) async fn conn(&self) -> Result<Object<AsyncPgConnection>, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// Opens every connection of both pools now, all at once, and prepares the grouped
    /// placement statements on each placement connection: an analyzer that starts (or is
    /// added under load) would otherwise give its first commands the wait for PostgreSQL to
    /// start a backend per connection and to plan each statement (and its triggers) there,
    /// one after another as groups need them. At a steady 1,000 commands/s that was most of
    /// the slowest percent.
    pub async fn warm(&self) -> Result<(), StoreError> {
        // Held together, so each checkout opens a connection of its own.
        let placement = (0..self.pool.status().max_size).map(|_| self.pool.get());
        let scans = (0..self.scans.status().max_size).map(|_| self.scans.get());
        let (mut placement, scans) = futures::future::try_join(
            futures::future::try_join_all(placement),
            futures::future::try_join_all(scans),
        )
        .await?;
        drop(scans);
        futures::future::try_join_all(placement.iter_mut().map(|conn| prepare(conn))).await?;
        Ok(())
    }

    /// A connection for a query that reads a whole table (or most of it).
    pub(crate) async fn scan_conn(&self) -> Result<Object<AsyncPgConnection>, StoreError> {
        Ok(self.scans.get().await?)
    }
}

type Setup = fn(&str) -> BoxFuture<'_, diesel::ConnectionResult<AsyncPgConnection>>;

fn pool(url: &str, max_size: usize, setup: Setup) -> Result<Pool<AsyncPgConnection>, StoreError> {
    // A checkout only checks that the connection is open and has no broken transaction (the
    // default also runs `SELECT 1`: one more round trip for every statement). A connection
    // lost since fails its first query with an error callers retry.
    let mut config = ManagerConfig::default();
    config.recycling_method = RecyclingMethod::Fast;
    config.custom_setup = Box::new(setup);
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url, config);
    Pool::builder(manager)
        .max_size(max_size)
        .build()
        .map_err(|e| StoreError::Pool(e.to_string()))
}

/// A new pooled connection. Every statement berth sends on the placement path is prepared
/// and reaches rows through their keys, so the generic plan is the right one. By default
/// PostgreSQL plans a prepared statement anew for its first five executions and then whenever
/// a custom plan looks cheaper, which it kept doing for the commit CTE: planning was about a
/// quarter of its CPU time in `berth bench place`.
///
/// The generic plan is made once, at a statement's first use on the connection, often while
/// the tables are still nearly empty, when scanning a whole table looks cheaper than an index
/// probe; that plan would then stay while the table grows to thousands of rows. With
/// sequential scans off, a key lookup is always planned as one. Queries that have no index
/// to use (the sweeper's, by state) still scan.
async fn setup(url: String) -> diesel::ConnectionResult<AsyncPgConnection> {
    let mut conn = crate::connect::establish(&url).await?;
    conn.batch_execute("SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off")
        .await
        .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
    Ok(conn)
}

/// Runs each grouped placement statement once on `conn` with nothing to do (empty input,
/// an instance that does not exist): PostgreSQL parses and plans it, and the triggers it
/// fires, now. Nothing is written.
async fn prepare(conn: &mut AsyncPgConnection) -> Result<(), StoreError> {
    use diesel_async::RunQueryDsl;
    let none: [String; 0] = [];
    let _: Vec<crate::placement::CommitRow> = crate::prepared::Commit {
        id: "",
        version: berth_proto::Version::new(-1),
        leader: "",
        workers: &none,
        idxs: &[],
        bytes: &[],
        group: None,
    }
    .load(conn)
    .await?;
    let _: Vec<crate::placement::GroupRow> = crate::prepared::CommitMany {
        arrays: &crate::placement::GroupArrays::default(),
    }
    .load(conn)
    .await?;
    let _: Vec<(String, i64, bool)> = crate::prepared::StartUpsertMany {
        ids: &[],
        specs: &[],
        seqs: &[],
    }
    .load(conn)
    .await?;
    let _: Vec<(String, i64, String, i64)> = crate::prepared::ForwardMany {
        ids: &[],
        versions: &[],
        workers: &[],
        states: &[],
        endpoints: &[],
        restarts: &[],
        reasons: &[],
    }
    .load(conn)
    .await?;
    Ok(())
}

/// Applies pending migrations. Safe when several processes start at once: they take turns on
/// an advisory lock, and each one after the first finds nothing to do.
pub async fn migrate(url: &str) -> Result<usize, StoreError> {
    let mut conn = crate::connect::establish(url)
        .await
        .map_err(|e| StoreError::Migration(format!("cannot connect to {url}: {e}")))?;
    diesel::sql_query(format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))
        .execute(&mut conn)
        .await?;
    // The harness drives diesel's sync migration code on a blocking thread.
    let (conn, applied) = tokio::task::spawn_blocking(move || {
        let mut harness = AsyncMigrationHarness::new(conn);
        let applied = harness
            .run_pending_migrations(MIGRATIONS)
            .map(|v| v.len())
            .map_err(|e| StoreError::Migration(e.to_string()));
        (harness.into_inner(), applied)
    })
    .await
    .map_err(|e| StoreError::Migration(format!("migration task failed: {e}")))?;
    let mut conn = conn;
    diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))
        .execute(&mut conn)
        .await?;
    applied
}

/// Creates database `name` next to the one `url` points at (for benchmarks that need a clean
/// second database on the same server) and returns its URL.
pub async fn create_database(url: &str, name: &str) -> Result<String, StoreError> {
    if !name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
        return Err(StoreError::Corrupt(format!("database name {name:?}")));
    }
    let mut conn = crate::connect::establish(url)
        .await
        .map_err(|e| StoreError::Migration(format!("cannot connect to {url}: {e}")))?;
    diesel::sql_query(format!("DROP DATABASE IF EXISTS {name}"))
        .execute(&mut conn)
        .await?;
    diesel::sql_query(format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await?;
    let base = url.rsplit_once('/').map_or(url, |(b, _)| b);
    Ok(format!("{base}/{name}"))
}
