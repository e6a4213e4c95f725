//! The OpenAI-compatible front door: requests routed by their `model` field to the least busy
//! running instance, responses (streamed or not) passed through as they come.

use crate::{App, errors::ApiError, routes::InFlight};
use axum::{
    Json,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use berth_proto::text::error_chain;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use std::{error::Error as _, sync::Arc};

/// Instances of one model a request is tried on, at most.
const MAX_ATTEMPTS: usize = 3;
/// Which instance answered, on every proxied response.
pub const INSTANCE_HEADER: &str = "x-berth-instance";

pub type Upstream = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

pub fn upstream(connect_timeout: std::time::Duration) -> Upstream {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(60))
        .build(http)
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelList {
    /// Always `list`.
    object: &'static str,
    data: Vec<Model>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Model {
    /// The name to put in a request's `model`.
    id: String,
    /// Always `model`.
    object: &'static str,
    created: i64,
    owned_by: &'static str,
}

/// `GET /v1/models`: the models that have a running instance now.
#[utoipa::path(get, path = "/v1/models", tag = "inference",
    responses((status = 200, body = ModelList), (status = 401, body = crate::errors::ErrorBody)),
    security(("bearer" = [])))]
pub async fn models(State(app): State<Arc<App>>) -> Json<ModelList> {
    let data = app
        .routes
        .models()
        .into_iter()
        .map(|id| Model {
            id,
            object: "model",
            created: 0,
            owned_by: "berth",
        })
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
}

#[derive(Deserialize)]
struct Target {
    model: Option<serde_json::Value>,
}

/// `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`.
pub async fn forward(State(app): State<Arc<App>>, req: Request) -> Response {
    match forward_inner(&app, req).await {
        Ok(r) => r,
        Err(e) => {
            app.metrics.proxied(e.status);
            e.into_response()
        }
    }
}

async fn forward_inner(app: &App, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let body = crate::read_body(body, app.config.max_body_bytes).await?;
    let name = model_of(&body)?;
    let path = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |p| p.as_str())
        .to_owned();

    let mut tried: Vec<String> = Vec::new();
    let mut last_failure = String::new();
    while tried.len() < MAX_ATTEMPTS {
        let Some(flight) = app.routes.pick(&name, &tried) else {
            break;
        };
        let route = flight.route();
        let upstream_req = upstream_request(&parts.headers, route, &path, body.clone())?;
        let sent = tokio::time::timeout(
            app.config.response_timeout,
            app.upstream.request(upstream_req),
        )
        .await;
        match sent {
            Ok(Ok(resp)) => {
                app.metrics.proxied(resp.status());
                return Ok(respond(resp, flight));
            }
            Ok(Err(e)) if retryable(&e) => {
                tracing::info!(instance_id = %route.instance_id, endpoint = %route.endpoint, error = %error_chain(&e), "upstream refused or reset before answering; trying another instance");
                app.metrics.retried();
                last_failure = format!(
                    "{} ({}): {}",
                    route.instance_id,
                    route.endpoint,
                    error_chain(&e)
                );
                tried.push(route.instance_id.clone());
            }
            Ok(Err(e)) => {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_error",
                    format!("instance {} failed: {}", route.instance_id, error_chain(&e)),
                ));
            }
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    format!(
                        "instance {} did not answer within {}",
                        route.instance_id,
                        humantime::format_duration(app.config.response_timeout)
                    ),
                ));
            }
        }
    }
    if tried.is_empty() {
        return Err(not_routable(app, &name).await);
    }
    Err(ApiError::new(
        StatusCode::BAD_GATEWAY,
        "upstream_unreachable",
        format!(
            "no instance of {name:?} could be reached ({} tried); last: {last_failure}",
            tried.len()
        ),
    ))
}

/// The `model` a request names.
fn model_of(body: &[u8]) -> Result<String, ApiError> {
    let target: Target = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("the request body is not a JSON object: {e}"))
    })?;
    match target.model {
        Some(serde_json::Value::String(m)) if !m.is_empty() => Ok(m),
        Some(serde_json::Value::String(_)) | None => {
            Err(ApiError::bad_request("the request names no model").param("model"))
        }
        Some(_) => Err(ApiError::bad_request("`model` must be a string").param("model")),
    }
}

/// Headers that belong to one connection, not to the request (RFC 9110 §7.6.1), and the
/// caller's key, which is berth's business and not the model server's.
fn passes(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "authorization"
            | "content-length"
    )
}

fn upstream_request(
    headers: &HeaderMap,
    route: &crate::routes::Route,
    path: &str,
    body: Bytes,
) -> Result<hyper::Request<Full<Bytes>>, ApiError> {
    let uri = format!("http://{}{}", route.endpoint, path);
    let mut b = hyper::Request::post(&uri);
    for (k, v) in headers.iter().filter(|(k, _)| passes(k)) {
        b = b.header(k, v);
    }
    b.body(Full::new(body))
        .map_err(|e| ApiError::internal(&format!("cannot address instance at {uri}"), &e))
}

fn respond(resp: hyper::Response<hyper::body::Incoming>, flight: InFlight) -> Response {
    let (mut parts, body) = resp.into_parts();
    let dropped: Vec<HeaderName> = parts
        .headers
        .keys()
        .filter(|k| !passes(k) && *k != header::CONTENT_LENGTH)
        .cloned()
        .collect();
    for k in dropped {
        parts.headers.remove(k);
    }
    if let Ok(v) = HeaderValue::from_str(&flight.route().instance_id) {
        parts.headers.insert(INSTANCE_HEADER, v);
    }
    // Chunks go out as they come (server-sent events included). The guard lives as long as
    // the body: the request counts as in flight until the last byte, or until the client
    // goes away, which drops the body and with it the upstream connection.
    let body = body.map_frame(move |frame| {
        let _counted = &flight;
        frame
    });
    Response::from_parts(parts, Body::new(body))
}

/// A connection refused, or closed before any byte of the response: nothing reached the
/// client yet, so another instance may answer instead.
fn retryable(e: &hyper_util::client::legacy::Error) -> bool {
    if e.is_connect() {
        return true;
    }
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_closed() || h.is_canceled())
        {
            return true;
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionRefused
            )
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// Why nothing serves `name`: 404 with what is served when no instance was ever started
/// under that name, 503 with each instance's state and reason when some were.
async fn not_routable(app: &App, name: &str) -> ApiError {
    let rows = match app.store.routes_named(name).await {
        Ok(rows) => rows,
        Err(e) => return ApiError::internal("cannot read the instances of this model", &e),
    };
    if rows.is_empty() {
        let served = app.routes.models();
        let list = if served.is_empty() {
            "none".to_owned()
        } else {
            served.join(", ")
        };
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("the model {name:?} does not exist here; models served now: {list}"),
        )
        .param("model");
    }
    let states: Vec<String> = rows
        .iter()
        .map(|r| match &r.reason {
            Some(why) => format!("{} is {}: {why}", r.id, r.state),
            None => format!("{} is {}", r.id, r.state),
        })
        .collect();
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "model_not_ready",
        format!(
            "the model {name:?} has no running instance: {}",
            states.join("; ")
        ),
    )
    .param("model")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_is_read_from_any_json_body_and_a_bad_one_is_refused() {
        assert_eq!(
            model_of(br#"{"model":"m","messages":[],"x":{"deep":[1,2]}}"#).unwrap(),
            "m"
        );
        for bad in [
            &b"not json"[..],
            br#"{"messages":[]}"#,
            br#"{"model":""}"#,
            br#"{"model":7}"#,
            br#"[1,2]"#,
        ] {
            let e = model_of(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }

    #[test]
    fn connection_headers_and_the_callers_key_stay_here() {
        for h in ["authorization", "connection", "host", "transfer-encoding"] {
            assert!(!passes(&HeaderName::from_static(h)), "{h}");
        }
        for h in ["content-type", "accept", "x-request-id"] {
            assert!(passes(&HeaderName::from_static(h)), "{h}");
        }
    }
}
