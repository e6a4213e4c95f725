//! Connections and migrations.

use crate::StoreError;
use diesel_async::{
    AsyncConnection, AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl,
    pooled_connection::{
        AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
        deadpool::{Object, Pool},
    },
};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

/// The SQL under `migrations/`, compiled into every binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations");

/// Arbitrary constant: the advisory lock that serializes concurrent migration runs.
const MIGRATION_LOCK: i64 = 0x6265_7274_685f_6d67; // "berth_mg"

/// A pool of connections to berth's database.
#[derive(Clone)]
pub struct Store {
    pool: Pool<AsyncPgConnection>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("status", &self.pool.status())
            .finish()
    }
}

impl Store {
    /// A pool of at most `max_size` connections; connections are made lazily.
    pub fn connect(url: &str, max_size: usize) -> Result<Store, StoreError> {
        // A checkout only checks that the connection is open and has no broken transaction
        // (the default also runs `SELECT 1`: one more round trip for every statement). A
        // connection lost since fails its first query with an error callers retry.
        let mut config = ManagerConfig::default();
        config.recycling_method = RecyclingMethod::Fast;
        config.custom_setup = Box::new(|url| Box::pin(setup(url.to_owned())));
        let manager =
            AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url, config);
        let pool = Pool::builder(manager)
            .max_size(max_size.max(1))
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        Ok(Store { pool })
    }

    pub(crate) async fn conn(&self) -> Result<Object<AsyncPgConnection>, StoreError> {
        Ok(self.pool.get().await?)
    }
}

/// A new pooled connection. Every statement berth sends is prepared and looks rows up by key,
/// so the generic plan is the right one. By default PostgreSQL plans a prepared statement
/// anew for its first five executions and then whenever a custom plan looks cheaper, which it
/// kept doing for the commit CTE: planning was about a quarter of its CPU time in
/// `berth bench place`.
async fn setup(url: String) -> diesel::ConnectionResult<AsyncPgConnection> {
    let mut conn = AsyncPgConnection::establish(&url).await?;
    diesel::sql_query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut conn)
        .await
        .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
    Ok(conn)
}

/// Applies pending migrations. Safe when several processes start at once: they take turns on
/// an advisory lock, and each one after the first finds nothing to do.
pub async fn migrate(url: &str) -> Result<usize, StoreError> {
    let mut conn = AsyncPgConnection::establish(url)
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
    let mut conn = AsyncPgConnection::establish(url)
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
