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
    /// server that is shutting down, starting, or no longer the primary.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Pool(_) => true,
            StoreError::Db(DieselError::DatabaseError(kind, info)) => match kind {
                DatabaseErrorKind::SerializationFailure
                | DatabaseErrorKind::ClosedConnection
                | DatabaseErrorKind::UnableToSendCommand
                | DatabaseErrorKind::ReadOnlyTransaction => true,
                // 40P01 deadlock_detected, 57P01 admin_shutdown, 57P03 cannot_connect_now,
                // 08xxx connection exceptions (diesel does not expose the SQLSTATE)
                _ => {
                    let msg = info.message();
                    msg.contains("deadlock")
                        || msg.contains("terminating connection")
                        || msg.contains("the database system is")
                        || msg.contains("connection")
                }
            },
            StoreError::Db(DieselError::BrokenTransactionManager) => true,
            _ => false,
        }
    }
}

impl From<diesel_async::pooled_connection::deadpool::PoolError> for StoreError {
    fn from(e: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        // With its causes: "password authentication failed" is what a user needs to see.
        StoreError::Pool(crate::connect::chain(&e))
    }
}
