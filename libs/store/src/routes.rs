//! What the gateway routes by: each instance's model name, state, endpoint and reason.

use crate::{Store, StoreError, schema::instances};
use diesel::{
    prelude::*,
    sql_types::{Bool, Nullable, Text},
};
use diesel_async::RunQueryDsl;

/// One instance as the gateway sees it.
#[derive(Debug, Clone, PartialEq, Eq, Queryable)]
pub struct RouteRow {
    pub id: String,
    /// The start's `model` name ("" when it gave none).
    pub model: String,
    pub state: String,
    pub endpoint: Option<String>,
    pub reason: Option<String>,
}

impl RouteRow {
    /// Where requests may go now: a running instance with a server.
    pub fn serving(&self) -> Option<&str> {
        let running = self.state == berth_proto::InstanceState::Running.as_str();
        self.endpoint.as_deref().filter(|_| running)
    }
}

type RouteQuery<'a> =
    instances::BoxedQuery<'a, diesel::pg::Pg, (Text, Text, Text, Nullable<Text>, Nullable<Text>)>;

/// Id, model name, state, endpoint and reason of instances, ordered by id.
fn route_query<'a>() -> RouteQuery<'a> {
    instances::table
        .select((
            instances::id,
            diesel::dsl::sql::<Text>("COALESCE(spec->>'model', '')"),
            instances::state,
            instances::endpoint,
            instances::reason,
        ))
        .order(instances::id)
        .into_boxed()
}

impl Store {
    /// Every instance that was ever started, or (with `ids`) those of them.
    pub async fn routes(&self, ids: Option<&[String]>) -> Result<Vec<RouteRow>, StoreError> {
        let mut conn = self.conn().await?;
        let mut q = route_query();
        if let Some(ids) = ids {
            q = q.filter(instances::id.eq_any(ids));
        }
        Ok(q.load(&mut conn).await?)
    }

    /// The instances a request for `name` could mean: started with that model name, or with
    /// that id.
    pub async fn routes_named(&self, name: &str) -> Result<Vec<RouteRow>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(route_query()
            .filter(
                instances::id
                    .eq(name)
                    .or(diesel::dsl::sql::<Bool>("spec->>'model' = ").bind::<Text, _>(name)),
            )
            .load(&mut conn)
            .await?)
    }
}
