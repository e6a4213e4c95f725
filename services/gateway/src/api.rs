//! The management API under `/api/v1` (admin keys): instances with their placement and
//! history, start and stop (published to NATS like any client's command), workers with their
//! GPUs' memory, and the instance events as server-sent events.

use crate::{App, errors::ApiError};
use axum::{
    Json, Router,
    extract::{Path, Query, Request, State},
    http::StatusCode,
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post},
};
use berth_proto::{
    CmdSeq, Command, InstanceEvent, InstanceState, StartSpec, StopSpec, Version, subjects,
};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use std::{collections::BTreeMap, convert::Infallible, sync::Arc, time::Duration};

/// Events of an instance that `GET /api/v1/instances/{id}` returns, at most.
const HISTORY: usize = 1000;
/// The longest `wait` a start or stop may ask for.
const MAX_WAIT_SECONDS: u64 = 3600;

pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/api/v1/instances", get(list_instances))
        .route("/api/v1/instances/{id}", get(get_instance))
        .route("/api/v1/instances/{id}/start", post(start))
        .route("/api/v1/instances/{id}/stop", post(stop))
        .route("/api/v1/workers", get(workers))
        .route("/api/v1/events", get(events))
}

/// One GPU's share of an instance.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Allocation {
    pub worker_id: String,
    pub gpu: i32,
    pub bytes: i64,
    /// The instance version this reservation belongs to.
    pub version: Version,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Instance {
    pub id: String,
    /// The start's model name ("" when it gave none).
    pub model: String,
    /// `running` or `stopped`: what the newest command asked for.
    pub desired: String,
    pub state: InstanceState,
    /// Why it is in this state, when berth knows (e.g. what each worker lacked).
    pub reason: Option<String>,
    /// The worker that leads it, when placed.
    pub worker_id: Option<String>,
    /// `host:port` of its model server, while one runs.
    pub endpoint: Option<String>,
    pub restarts: i32,
    pub cmd_seq: CmdSeq,
    pub version: Version,
    /// GPU memory reserved for it.
    pub placement: Vec<Allocation>,
    /// RFC 3339.
    pub updated_at: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InstanceDetail {
    #[serde(flatten)]
    pub instance: Instance,
    /// The start it runs under, as sent.
    pub spec: Option<StartSpec>,
    /// Its events of the last day, oldest first.
    pub history: Vec<InstanceEvent>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Gpu {
    pub idx: i32,
    pub name: String,
    pub uuid: String,
    pub total_bytes: i64,
    /// Kept back for the system on this GPU.
    pub system_reserved_bytes: i64,
    /// Reserved by berth's instances.
    pub reserved_bytes: i64,
    /// In use by processes berth does not run, as the agent last reported.
    pub used_outside_bytes: i64,
    /// What berth may still reserve (negative when outside use took more than was left).
    pub free_bytes: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Worker {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    /// False while its agent is silent: nothing new is placed on it.
    pub schedulable: bool,
    /// RFC 3339.
    pub last_heartbeat: String,
    pub gpus: Vec<Gpu>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Accepted {
    pub instance_id: String,
    /// The command's stream sequence: its place in the order of commands.
    pub cmd_seq: CmdSeq,
    /// With `wait`: the event of the resting state the instance reached under this command
    /// (running, pending, stopped or error); absent when `timeout` passed first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settled: Option<InstanceEvent>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Answer once the instance settles (running, pending, stopped, error) instead of at once.
    #[serde(default)]
    wait: bool,
    /// With `wait`: seconds to wait at most (default 60).
    timeout: Option<u64>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only this instance's events.
    instance: Option<String>,
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn instance_view(
    row: &berth_store::InstanceRow,
    allocs: &[berth_store::AllocationRow],
) -> Result<Instance, ApiError> {
    let state = row
        .lifecycle_state()
        .map_err(|e| ApiError::internal("an instance row is corrupt", &e))?;
    let model = row
        .spec
        .as_ref()
        .and_then(|s| s.get("model"))
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_owned();
    Ok(Instance {
        id: row.id.clone(),
        model,
        desired: row.desired.clone(),
        state,
        reason: row.reason.clone(),
        worker_id: row.worker_id.clone(),
        endpoint: row.endpoint.clone(),
        restarts: row.restarts,
        cmd_seq: row.cmd_seq,
        version: row.version,
        placement: allocs
            .iter()
            .filter(|a| a.instance_id == row.id)
            .map(|a| Allocation {
                worker_id: a.worker_id.clone(),
                gpu: a.gpu_idx,
                bytes: a.bytes,
                version: a.version,
            })
            .collect(),
        updated_at: rfc3339(row.updated_at),
    })
}

/// `GET /api/v1/instances`
#[utoipa::path(get, path = "/api/v1/instances", tag = "manage",
    responses((status = 200, body = Vec<Instance>), (status = 401, body = crate::errors::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_instances(State(app): State<Arc<App>>) -> Result<Json<Vec<Instance>>, ApiError> {
    let (rows, allocs) = tokio::try_join!(app.store.instances(), app.store.allocations())?;
    let list = rows
        .iter()
        .map(|r| instance_view(r, &allocs))
        .collect::<Result<_, _>>()?;
    Ok(Json(list))
}

/// `GET /api/v1/instances/{id}`
#[utoipa::path(get, path = "/api/v1/instances/{id}", tag = "manage",
    params(("id" = String, Path, description = "Instance id")),
    responses((status = 200, body = InstanceDetail), (status = 404, body = crate::errors::ErrorBody),
        (status = 401, body = crate::errors::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_instance(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<InstanceDetail>, ApiError> {
    valid_id(&id)?;
    let row = app.store.instance(&id).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "instance_not_found",
            format!("no instance {id:?}"),
        )
    })?;
    let allocs = app.store.allocations().await?;
    let history = app
        .bus
        .history(&id, HISTORY)
        .await
        .map_err(|e| ApiError::internal("cannot read the instance's events", &e))?;
    let spec = row.start_spec();
    Ok(Json(InstanceDetail {
        instance: instance_view(&row, &allocs)?,
        spec,
        history,
    }))
}

/// `POST /api/v1/instances/{id}/start`: the body is the start spec, as JSON.
#[utoipa::path(post, path = "/api/v1/instances/{id}/start", tag = "manage",
    params(("id" = String, Path, description = "Instance id"), WaitQuery),
    request_body = StartSpec,
    responses((status = 202, description = "Accepted (and, with wait, not settled in time)", body = Accepted),
        (status = 200, description = "Settled (with wait)", body = Accepted),
        (status = 400, body = crate::errors::ErrorBody), (status = 401, body = crate::errors::ErrorBody)),
    security(("bearer" = [])))]
pub async fn start(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(wait): Query<WaitQuery>,
    req: Request,
) -> Result<Response, ApiError> {
    valid_id(&id)?;
    let body = crate::read_body(req.into_body(), berth_proto::command::MAX_COMMAND_BYTES).await?;
    let spec: StartSpec = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the start spec is not valid: {e}")))?;
    publish(&app, &id, Command::Start(spec), &wait).await
}

/// `POST /api/v1/instances/{id}/stop`: the body, optional, is `{"reason": "…"}`.
#[utoipa::path(post, path = "/api/v1/instances/{id}/stop", tag = "manage",
    params(("id" = String, Path, description = "Instance id"), WaitQuery),
    request_body(content = Option<StopSpec>),
    responses((status = 202, description = "Accepted (and, with wait, not settled in time)", body = Accepted),
        (status = 200, description = "Settled (with wait)", body = Accepted),
        (status = 400, body = crate::errors::ErrorBody), (status = 401, body = crate::errors::ErrorBody)),
    security(("bearer" = [])))]
pub async fn stop(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(wait): Query<WaitQuery>,
    req: Request,
) -> Result<Response, ApiError> {
    valid_id(&id)?;
    let body = crate::read_body(req.into_body(), berth_proto::command::MAX_COMMAND_BYTES).await?;
    let spec: StopSpec = if body.iter().all(u8::is_ascii_whitespace) {
        StopSpec::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("the stop is not valid: {e}")))?
    };
    publish(&app, &id, Command::Stop(spec), &wait).await
}

fn valid_id(id: &str) -> Result<(), ApiError> {
    subjects::validate_id(id)
        .map_err(|e| ApiError::bad_request(format!("bad instance id: {e}")).param("id"))
}

/// Checks `cmd` as an analyzer would, publishes it, and with `wait` follows its events.
async fn publish(
    app: &App,
    id: &str,
    cmd: Command,
    wait: &WaitQuery,
) -> Result<Response, ApiError> {
    // The analyzers' own check, on the bytes they would get: what they would refuse is a 400
    // here, not a dead letter later.
    let bytes = cmd
        .encode()
        .map_err(|e| ApiError::bad_request(format!("cannot encode the command: {e}")))?;
    Command::decode(&bytes).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let timeout = Duration::from_secs(wait.timeout.unwrap_or(60).clamp(1, MAX_WAIT_SECONDS));
    let mut events =
        if wait.wait {
            let subject = subjects::event_subject(id)
                .map_err(|e| ApiError::bad_request(format!("bad instance id: {e}")))?;
            Some(
                app.bus.client().subscribe(subject).await.map_err(|e| {
                    ApiError::internal("cannot subscribe to the instance's events", &e)
                })?,
            )
        } else {
            None
        };
    let cmd_seq = app
        .bus
        .publish_command(id, &cmd)
        .await
        .map_err(|e| ApiError::internal("NATS did not take the command", &e))?;
    let settled = match events.as_mut() {
        Some(events) => {
            let deadline = tokio::time::Instant::now() + timeout;
            berth_bus::settle::settled(events, cmd_seq, deadline, |_| {}).await
        }
        None => None,
    };
    let status = if settled.is_some() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let body = Accepted {
        instance_id: id.to_owned(),
        cmd_seq,
        settled,
    };
    Ok((status, Json(body)).into_response())
}

/// `GET /api/v1/workers`
#[utoipa::path(get, path = "/api/v1/workers", tag = "manage",
    responses((status = 200, body = Vec<Worker>), (status = 401, body = crate::errors::ErrorBody)),
    security(("bearer" = [])))]
pub async fn workers(State(app): State<Arc<App>>) -> Result<Json<Vec<Worker>>, ApiError> {
    let grouped = app.store.capacity().await?;
    let list = grouped
        .into_iter()
        .map(|(w, gpus)| Worker {
            labels: serde_json::from_value(w.labels).unwrap_or_default(),
            id: w.id,
            schedulable: w.schedulable,
            last_heartbeat: rfc3339(w.last_heartbeat),
            gpus: gpus
                .into_iter()
                .map(|g| Gpu {
                    free_bytes: g.free_bytes(),
                    idx: g.idx,
                    name: g.name,
                    uuid: g.uuid,
                    total_bytes: g.total_bytes,
                    system_reserved_bytes: g.system_reserved_bytes,
                    reserved_bytes: g.reserved_bytes,
                    used_outside_bytes: g.used_outside_bytes,
                })
                .collect(),
        })
        .collect();
    Ok(Json(list))
}

/// `GET /api/v1/events`: every instance event as it happens, as server-sent events named
/// `instance` whose data is the event as JSON (docs/protocol.md).
#[utoipa::path(get, path = "/api/v1/events", tag = "manage", params(EventsQuery),
    responses((status = 200, content_type = "text/event-stream", body = InstanceEvent,
        description = "A stream of `instance` events, each an InstanceEvent as JSON"),
        (status = 401, body = crate::errors::ErrorBody)),
    security(("bearer" = [])))]
pub async fn events(
    State(app): State<Arc<App>>,
    Query(q): Query<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let subject = match &q.instance {
        Some(id) => subjects::event_subject(id).map_err(|e| {
            ApiError::bad_request(format!("bad instance id: {e}")).param("instance")
        })?,
        None => subjects::ALL_EVENTS.to_owned(),
    };
    let sub = app
        .bus
        .client()
        .subscribe(subject)
        .await
        .map_err(|e| ApiError::internal("cannot subscribe to events", &e))?;
    let stream = sub.filter_map(|msg| async move {
        let ev = berth_proto::decode::<InstanceEvent>(&msg.payload).ok()?;
        let event = Event::default().event("instance").json_data(&ev).ok()?;
        Some(Ok(event))
    });
    // Ended when the gateway stops: an endless response would hold its graceful shutdown
    // (and every page following it) forever.
    let stream = stream.take_until(app.shutdown.clone().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
