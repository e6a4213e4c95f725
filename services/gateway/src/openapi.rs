//! The OpenAPI document of `/v1` and `/api/v1`, generated from the handlers and types, served
//! at `/api/v1/openapi.json` (no key needed: it describes, it does not reveal).

use axum::Json;
use utoipa::{
    Modify, OpenApi,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "berth gateway",
        description = "OpenAI-compatible inference routed by model name, and the management API of a berth fleet."
    ),
    paths(
        crate::proxy::models,
        crate::api::list_instances,
        crate::api::get_instance,
        crate::api::start,
        crate::api::stop,
        crate::api::workers,
        crate::api::events,
    ),
    components(schemas(crate::errors::ErrorBody)),
    modifiers(&Bearer),
    tags(
        (name = "inference", description = "OpenAI-compatible: /v1/chat/completions, /v1/completions and /v1/embeddings are passed through to the model server unchanged"),
        (name = "manage", description = "Instances, workers and events (admin keys)")
    )
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// The document as JSON text, for `berth-gateway --openapi` and the docs.
pub fn json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}
