//! The event outbox: every state change of an instance is recorded by the transaction that
//! made it (a trigger, see the migration), and relayed to NATS from here. One relay at a time
//! (an advisory lock per batch), in outbox order, which for one instance is its commit order
//! (its changes are serialized by its row lock); rows are deleted only once NATS has stored
//! them, so a crash re-sends instead of losing.

use crate::{Store, StoreError, schema::event_outbox};
use berth_proto::{CmdSeq, InstanceEvent, InstanceState, Version};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use std::future::Future;

/// Arbitrary constant: the advisory lock that makes one relay at a time.
const RELAY_LOCK: i64 = 0x6265_7274_6865_7674; // "berthevt"

diesel::define_sql_function! {
    fn pg_try_advisory_xact_lock(key: diesel::sql_types::BigInt) -> diesel::sql_types::Bool;
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = event_outbox)]
struct OutboxRow {
    seq: i64,
    instance_id: String,
    state: String,
    version: Version,
    cmd_seq: CmdSeq,
    worker_id: Option<String>,
    gpus: Vec<i32>,
    reason: Option<String>,
    at: DateTime<Utc>,
    endpoint: Option<String>,
    restarts: i32,
}

/// An event waiting in the outbox, with the id that makes re-sending it harmless.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// Unique per change (`instance:version:state:cmd_seq:restarts`; the sequence tells a
    /// rejected command's note from the state it leaves alone, the restart count a restarted
    /// server's `starting` and `running` from the first ones): NATS drops a second copy.
    pub msg_id: String,
    pub event: InstanceEvent,
}

/// How a relay round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relayed {
    /// Another relay holds the turn.
    Busy,
    /// This many events were published and removed (0: nothing was waiting).
    Sent(usize),
}

impl Store {
    /// Hands the oldest waiting events (at most `limit`) to `publish`, and removes them once
    /// it succeeds; on its error nothing is removed and the error is returned.
    pub async fn relay_events<F, Fut, E>(
        &self,
        limit: i64,
        publish: F,
    ) -> Result<Relayed, RelayError<E>>
    where
        F: FnOnce(Vec<OutboxEvent>) -> Fut + Send,
        Fut: Future<Output = Result<(), E>> + Send,
        E: Send,
    {
        let mut conn = self.conn().await?;
        (*conn)
            .transaction::<_, RelayError<E>, _>(async |conn| {
                let turn: bool = diesel::select(pg_try_advisory_xact_lock(RELAY_LOCK))
                    .get_result(conn)
                    .await?;
                if !turn {
                    return Ok(Relayed::Busy);
                }
                let rows: Vec<OutboxRow> = event_outbox::table
                    .select(OutboxRow::as_select())
                    .order(event_outbox::seq)
                    .limit(limit)
                    .load(conn)
                    .await?;
                if rows.is_empty() {
                    return Ok(Relayed::Sent(0));
                }
                // Exactly these rows: a sequence number is taken when a change is written,
                // not when it commits, so a lower one may become visible after this read.
                let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
                let events = rows.into_iter().map(to_event).collect::<Result<_, _>>()?;
                publish(events).await.map_err(RelayError::Publish)?;
                diesel::delete(event_outbox::table.filter(event_outbox::seq.eq_any(&seqs)))
                    .execute(conn)
                    .await?;
                Ok(Relayed::Sent(seqs.len()))
            })
            .await
    }

    /// Events waiting to be relayed.
    pub async fn outbox_len(&self) -> Result<i64, StoreError> {
        let mut conn = self.scan_conn().await?;
        Ok(event_outbox::table.count().get_result(&mut conn).await?)
    }
}

/// Why a relay round ended without removing anything.
#[derive(Debug, thiserror::Error)]
pub enum RelayError<E> {
    /// The outbox could not be read or cleared.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Publishing refused or failed; the events stay for the next round.
    #[error("cannot publish events: {0}")]
    Publish(#[source] E),
}

impl<E> From<diesel::result::Error> for RelayError<E> {
    fn from(e: diesel::result::Error) -> Self {
        RelayError::Store(e.into())
    }
}

fn to_event(r: OutboxRow) -> Result<OutboxEvent, StoreError> {
    let state: InstanceState = r
        .state
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("outbox state {:?}", r.state)))?;
    Ok(OutboxEvent {
        msg_id: format!(
            "{}:{}:{}:{}:{}",
            r.instance_id, r.version, r.state, r.cmd_seq, r.restarts
        ),
        event: InstanceEvent {
            instance_id: r.instance_id,
            state,
            version: r.version,
            cmd_seq: r.cmd_seq,
            worker_id: r.worker_id,
            gpus: r.gpus.iter().map(|g| g.unsigned_abs()).collect(),
            // Cut here too: rows written before reasons were bounded must not make an
            // event NATS refuses, which would hold up every event behind it.
            reason: r.reason.map(|why| {
                if why.len() > berth_proto::text::MAX_REASON_BYTES {
                    berth_proto::text::reason(&why)
                } else {
                    why
                }
            }),
            at_ms: r.at.timestamp_millis(),
            endpoint: r.endpoint,
            restarts: u32::try_from(r.restarts).unwrap_or(0),
        },
    })
}
