//! The route table: which running instance serves which model name, and how busy each is.
//!
//! One owner (`Routes`) behind a lock held only to copy or swap a few pointers. It is filled
//! from PostgreSQL (`follow.rs`) and read by every proxied request.

use berth_store::routes::RouteRow;
use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
};

/// One running instance that requests can go to.
#[derive(Debug)]
pub struct Route {
    pub instance_id: String,
    pub model: String,
    /// `host:port` of its model server.
    pub endpoint: String,
    in_flight: AtomicUsize,
}

impl Route {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// A request in flight on a route: counted from its choice until its response body ends or
/// is dropped (the client went away).
#[derive(Debug)]
pub struct InFlight(Arc<Route>);

impl InFlight {
    fn new(route: Arc<Route>) -> InFlight {
        route.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(route)
    }

    pub fn route(&self) -> &Route {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Table {
    by_instance: HashMap<String, Arc<Route>>,
    /// By model name and by instance id: the names a request may use.
    by_name: HashMap<String, Vec<Arc<Route>>>,
}

impl Table {
    fn reindex(&mut self) {
        let mut by_name: HashMap<String, Vec<Arc<Route>>> = HashMap::new();
        for r in self.by_instance.values() {
            if !r.model.is_empty() {
                by_name.entry(r.model.clone()).or_default().push(r.clone());
            }
            if r.model != r.instance_id {
                by_name
                    .entry(r.instance_id.clone())
                    .or_default()
                    .push(r.clone());
            }
        }
        for routes in by_name.values_mut() {
            routes.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        }
        self.by_name = by_name;
    }
}

#[derive(Debug, Default)]
pub struct Routes {
    table: RwLock<Table>,
    /// Where the tie-break among equally busy routes starts, so ties rotate.
    turn: AtomicUsize,
}

impl Routes {
    /// Takes in the rows read from the database. `complete`: these are all instances, so any
    /// route not among them is gone.
    pub fn apply(&self, rows: &[RouteRow], complete: bool) {
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        if complete {
            t.by_instance
                .retain(|id, _| rows.iter().any(|r| &r.id == id));
        }
        for row in rows {
            match row.serving() {
                Some(endpoint) => {
                    let same = t
                        .by_instance
                        .get(&row.id)
                        .is_some_and(|r| r.endpoint == endpoint && r.model == row.model);
                    if !same {
                        t.by_instance.insert(
                            row.id.clone(),
                            Arc::new(Route {
                                instance_id: row.id.clone(),
                                model: row.model.clone(),
                                endpoint: endpoint.to_owned(),
                                in_flight: AtomicUsize::new(0),
                            }),
                        );
                    }
                }
                None => {
                    t.by_instance.remove(&row.id);
                }
            }
        }
        t.reindex();
    }

    /// The least busy route for `name` (a model name or an instance id) among those not
    /// `tried`, counted in flight from now on.
    pub fn pick(&self, name: &str, tried: &[String]) -> Option<InFlight> {
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
        let routes = t.by_name.get(name)?;
        let n = routes.len();
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % n.max(1);
        let best = (0..n)
            .map(|i| &routes[(start + i) % n])
            .filter(|r| !tried.contains(&r.instance_id))
            .min_by_key(|r| r.in_flight())?;
        Some(InFlight::new(best.clone()))
    }

    /// The names a request may use now, sorted: model names, and the ids of instances
    /// started without one.
    pub fn models(&self) -> Vec<String> {
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<String> = t
            .by_instance
            .values()
            .map(|r| {
                if r.model.is_empty() {
                    r.instance_id.clone()
                } else {
                    r.model.clone()
                }
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Every route, by instance id.
    pub fn snapshot(&self) -> Vec<Arc<Route>> {
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = t.by_instance.values().cloned().collect();
        all.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, model: &str, state: &str, endpoint: Option<&str>) -> RouteRow {
        RouteRow {
            id: id.into(),
            model: model.into(),
            state: state.into(),
            endpoint: endpoint.map(Into::into),
            reason: None,
        }
    }

    #[test]
    fn only_running_instances_with_an_endpoint_are_routed() {
        let r = Routes::default();
        r.apply(
            &[
                row("a", "m", "running", Some("h:1")),
                row("b", "m", "starting", Some("h:2")),
                row("c", "m", "running", None),
                row("d", "m", "stopping", Some("h:4")),
            ],
            true,
        );
        let all: Vec<_> = r.snapshot().iter().map(|r| r.instance_id.clone()).collect();
        assert_eq!(all, ["a"]);
        assert_eq!(r.models(), ["m"]);
    }

    #[test]
    fn a_change_of_state_removes_the_route_at_once() {
        let r = Routes::default();
        r.apply(&[row("a", "m", "running", Some("h:1"))], true);
        assert!(r.pick("m", &[]).is_some());
        r.apply(&[row("a", "m", "stopping", Some("h:1"))], false);
        assert!(r.pick("m", &[]).is_none());
        assert!(r.pick("a", &[]).is_none());
    }

    #[test]
    fn a_complete_read_drops_instances_that_are_gone() {
        let r = Routes::default();
        r.apply(&[row("a", "m", "running", Some("h:1"))], true);
        r.apply(&[row("b", "m", "running", Some("h:2"))], false);
        assert_eq!(r.snapshot().len(), 2);
        r.apply(&[row("b", "m", "running", Some("h:2"))], true);
        let all: Vec<_> = r.snapshot().iter().map(|r| r.instance_id.clone()).collect();
        assert_eq!(all, ["b"]);
    }

    #[test]
    fn the_least_busy_instance_is_chosen_and_an_id_names_one_instance() {
        let r = Routes::default();
        r.apply(
            &[
                row("a", "m", "running", Some("h:1")),
                row("b", "m", "running", Some("h:2")),
            ],
            true,
        );
        let first = r.pick("m", &[]).unwrap();
        let second = r.pick("m", &[]).unwrap();
        assert_ne!(first.route().instance_id, second.route().instance_id);
        drop(first);
        let third = r.pick("m", &[]).unwrap();
        assert_ne!(third.route().instance_id, second.route().instance_id);
        assert_eq!(r.pick("b", &[]).unwrap().route().instance_id, "b");
        let tried = vec![
            second.route().instance_id.clone(),
            third.route().instance_id.clone(),
        ];
        assert!(r.pick("m", &tried).is_none());
    }

    #[test]
    fn in_flight_counts_end_with_their_guard_and_survive_a_reread() {
        let r = Routes::default();
        r.apply(&[row("a", "m", "running", Some("h:1"))], true);
        let g = r.pick("m", &[]).unwrap();
        r.apply(&[row("a", "m", "running", Some("h:1"))], true);
        assert_eq!(r.snapshot()[0].in_flight(), 1);
        drop(g);
        assert_eq!(r.snapshot()[0].in_flight(), 0);
    }

    #[test]
    fn an_instance_without_a_model_name_is_listed_by_its_id() {
        let r = Routes::default();
        r.apply(&[row("solo", "", "running", Some("h:1"))], true);
        assert_eq!(r.models(), ["solo"]);
        assert!(r.pick("solo", &[]).is_some());
        assert!(r.pick("", &[]).is_none());
    }
}
