use diesel::result::{DatabaseErrorKind, Error as DieselError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot get a database connection: {0}")]
    Pool(String),
    #[error("database error: {0}")]
    Db(#[from] DieselError),
    #[error("migrations failed: {0}")]
    Migration(String),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    /// A grouped statement failed; each request of the group gets this copy of the reason.
    #[error("grouped statement failed: {0}")]
    Group(String),
    /// A request the database would refuse, said plainly (e.g. a key name taken).
    #[error("{0}")]
    Invalid(String),
}

impl StoreError {
    /// Errors worth retrying: lost connections, serialization failures, deadlocks, and a
    /// server that is shutting down, starting, or no longer the primary. These are what a
    /// failover looks like from a client (the statement in flight loses its connection, a
    /// new connection finds no writable server, or lands on a standby), and a restart.
    pub fn is_transient(&self) -> bool {
        match self {
            // No connection could be made (none of the URL's hosts takes writes yet).
            StoreError::Pool(_) => true,
            StoreError::Db(DieselError::DatabaseError(kind, info)) => match kind {
                // 40001 (also a standby cancelling a query in conflict with recovery).
                DatabaseErrorKind::SerializationFailure
                // 25006: the server is (or became) a standby.
                | DatabaseErrorKind::ReadOnlyTransaction
                // No SQLSTATE: the connection broke (closed, reset, the server gone).
                | DatabaseErrorKind::ClosedConnection
                | DatabaseErrorKind::UnableToSendCommand => true,
                // diesel does not expose other SQLSTATEs: the server's words tell them.
                _ => transient_message(info.message()),
            },
            // A transaction whose COMMIT or ROLLBACK was cut off with its connection.
            StoreError::Db(DieselError::BrokenTransactionManager) => true,
            _ => false,
        }
    }
}

/// What PostgreSQL says (in English, its default) for the SQLSTATEs worth retrying that
/// diesel reports as `Unknown`.
const TRANSIENT_MESSAGES: [&str; 5] = [
    // 57P01 admin_shutdown, 57P02 crash_shutdown, 25P03 idle-in-transaction timeout, and
    // a backend ended by a conflict with recovery.
    "terminating connection",
    // 57P03 cannot_connect_now: starting up, shutting down, in recovery mode, not (yet)
    // accepting connections.
    "the database system is",
    // 40P01 deadlock_detected.
    "deadlock detected",
    // 40001 when worded for a serializable transaction.
    "could not serialize access",
    // Class 08 connection exceptions, and 53300 too_many_connections ("remaining
    // connection slots are reserved"), which a promoted server meets as every client
    // reconnects at once.
    "connection",
];

fn transient_message(message: &str) -> bool {
    TRANSIENT_MESSAGES.iter().any(|m| message.contains(m))
}

impl From<diesel_async::pooled_connection::deadpool::PoolError> for StoreError {
    fn from(e: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        // With its causes: "password authentication failed" is what a user needs to see.
        StoreError::Pool(crate::connect::chain(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(kind: DatabaseErrorKind, message: &str) -> StoreError {
        StoreError::Db(DieselError::DatabaseError(
            kind,
            Box::new(message.to_owned()),
        ))
    }

    /// The errors a client sees while its primary fails over, as PostgreSQL words them.
    #[test]
    fn what_a_failover_looks_like_is_retried() {
        use DatabaseErrorKind::{ReadOnlyTransaction, SerializationFailure, Unknown};
        for e in [
            db(
                Unknown,
                "terminating connection due to administrator command",
            ),
            db(
                Unknown,
                "terminating connection because of crash of another server process",
            ),
            db(Unknown, "the database system is starting up"),
            db(Unknown, "the database system is shutting down"),
            db(Unknown, "the database system is in recovery mode"),
            db(
                Unknown,
                "the database system is not yet accepting connections",
            ),
            db(Unknown, "deadlock detected"),
            db(
                Unknown,
                "remaining connection slots are reserved for roles with the SUPERUSER attribute",
            ),
            db(
                ReadOnlyTransaction,
                "cannot execute UPDATE in a read-only transaction",
            ),
            db(
                SerializationFailure,
                "canceling statement due to conflict with recovery",
            ),
            db(DatabaseErrorKind::UnableToSendCommand, "connection closed"),
            db(
                DatabaseErrorKind::ClosedConnection,
                "server closed the connection unexpectedly",
            ),
            StoreError::Pool(
                "error connecting to server: Connection refused (os error 111)".into(),
            ),
            StoreError::Db(DieselError::BrokenTransactionManager),
        ] {
            assert!(e.is_transient(), "{e}");
        }
    }

    /// What retrying cannot mend ends the command instead of redelivering it forever.
    #[test]
    fn refusals_of_the_data_are_not_retried() {
        use DatabaseErrorKind::{CheckViolation, UniqueViolation, Unknown};
        for e in [
            db(
                CheckViolation,
                "new row for relation \"gpus\" violates check constraint",
            ),
            db(
                UniqueViolation,
                "duplicate key value violates unique constraint",
            ),
            db(Unknown, "invalid byte sequence for encoding \"UTF8\": 0x00"),
            db(Unknown, "value too long for type character varying(64)"),
            StoreError::Corrupt("labels".into()),
            StoreError::Group("grouped statement failed".into()),
        ] {
            assert!(!e.is_transient(), "{e}");
        }
    }
}
