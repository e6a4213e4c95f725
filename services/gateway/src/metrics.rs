//! The gateway's `/metrics` (Prometheus text): proxied requests by status, retries on another
//! instance, routes, and requests in flight per instance.

use crate::routes::Routes;
use axum::http::StatusCode;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Debug, Default)]
pub struct Metrics {
    requests: Family<Vec<(String, String)>, Counter>,
    /// `requests{status="200"}`, resolved once.
    ok: std::sync::OnceLock<Counter>,
    retries: Counter,
}

fn label(status: StatusCode) -> Vec<(String, String)> {
    vec![("status".to_owned(), status.as_u16().to_string())]
}

impl Metrics {
    /// One proxied request ended with `status` (the upstream's, or the gateway's own).
    pub fn proxied(&self, status: StatusCode) {
        // The common answer without building its label set each time.
        if status == StatusCode::OK {
            self.ok
                .get_or_init(|| self.requests.get_or_create(&label(status)).clone())
                .inc();
            return;
        }
        self.requests.get_or_create(&label(status)).inc();
    }

    pub fn retried(&self) {
        self.retries.inc();
    }

    pub fn render(&self, routes: &Routes) -> String {
        let mut registry = Registry::default();
        let sub = registry.sub_registry_with_prefix("berth_gateway");
        sub.register(
            "requests",
            "Requests proxied to model servers, by HTTP status",
            self.requests.clone(),
        );
        sub.register(
            "upstream_retries",
            "Requests sent to another instance after one refused or reset the connection",
            self.retries.clone(),
        );
        let all = routes.snapshot();
        let count = Gauge::<i64>::default();
        count.set(i64::try_from(all.len()).unwrap_or(i64::MAX));
        sub.register("routes", "Running instances requests can go to", count);
        let in_flight = Family::<Vec<(String, String)>, Gauge>::default();
        for r in &all {
            in_flight
                .get_or_create(&vec![("instance".to_owned(), r.instance_id.clone())])
                .set(i64::try_from(r.in_flight()).unwrap_or(i64::MAX));
        }
        sub.register("in_flight", "Requests in flight, by instance", in_flight);
        let mut out = String::new();
        let _ = encode(&mut out, &registry);
        out
    }
}
