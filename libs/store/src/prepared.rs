//! Hand-written SQL that PostgreSQL parses and plans once per connection.
//!
//! `diesel::sql_query` is never cached as a prepared statement, so each call would be parsed,
//! planned and prepared again (two round trips). These types give each statement a static
//! query id, which puts it in the connection's prepared-statement cache like any DSL query.

use diesel::{
    pg::Pg,
    query_builder::{AstPass, Query, QueryFragment, QueryId},
    result::QueryResult,
    sql_types::{Array, BigInt, Bool, Integer, Jsonb, Nullable, Text},
};

/// A piece of a statement template: text, or the `$n` parameter.
enum Seg<'s> {
    Text(&'s str),
    Param(usize),
}

/// Splits `sql` at its `$n` parameters.
fn segments(sql: &str) -> Vec<Seg<'_>> {
    let mut out = Vec::new();
    let mut rest = sql;
    while let Some(pos) = rest.find('$') {
        let digits = rest[pos + 1..]
            .bytes()
            .take_while(u8::is_ascii_digit)
            .count();
        if digits == 0 {
            out.push(Seg::Text(&rest[..=pos]));
            rest = &rest[pos + 1..];
            continue;
        }
        out.push(Seg::Text(&rest[..pos]));
        out.push(Seg::Param(
            rest[pos + 1..pos + 1 + digits].parse().unwrap_or(0),
        ));
        rest = &rest[pos + 1 + digits..];
    }
    out.push(Seg::Text(rest));
    out
}

/// The placement commit (`placement::COMMIT`) with its seven parameters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Commit<'a> {
    pub id: &'a str,
    pub version: berth_proto::Version,
    pub leader: &'a str,
    pub workers: &'a [String],
    pub idxs: &'a [i32],
    pub bytes: &'a [i64],
    pub group: Option<&'a str>,
}

impl QueryId for Commit<'_> {
    type QueryId = Commit<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl Query for Commit<'_> {
    type SqlType = (
        Nullable<BigInt>,
        Bool,
        Nullable<Array<Text>>,
        Nullable<Array<Text>>,
    );
}

impl QueryFragment<Pg> for Commit<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        for seg in segments(crate::placement::COMMIT) {
            match seg {
                Seg::Text(t) => out.push_sql(t),
                Seg::Param(1) => out.push_bind_param::<Text, _>(&self.id)?,
                Seg::Param(2) => out.push_bind_param::<BigInt, _>(&self.version)?,
                Seg::Param(3) => out.push_bind_param::<Text, _>(&self.leader)?,
                Seg::Param(4) => out.push_bind_param::<Array<Text>, _>(&self.workers)?,
                Seg::Param(5) => out.push_bind_param::<Array<Integer>, _>(&self.idxs)?,
                Seg::Param(6) => out.push_bind_param::<Array<BigInt>, _>(&self.bytes)?,
                Seg::Param(_) => out.push_bind_param::<Nullable<Text>, _>(&self.group)?,
            }
        }
        Ok(())
    }
}

/// The many-row start (`commands::START_UPSERT_MANY`): ids, specs and sequences as arrays.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StartUpsertMany<'a> {
    pub ids: &'a [&'a str],
    pub specs: &'a [&'a serde_json::Value],
    pub seqs: &'a [i64],
}

impl QueryId for StartUpsertMany<'_> {
    type QueryId = StartUpsertMany<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl Query for StartUpsertMany<'_> {
    type SqlType = (Text, BigInt, Bool);
}

impl QueryFragment<Pg> for StartUpsertMany<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        for seg in segments(crate::commands::START_UPSERT_MANY) {
            match seg {
                Seg::Text(t) => out.push_sql(t),
                Seg::Param(1) => out.push_bind_param::<Array<Text>, _>(self.ids)?,
                Seg::Param(2) => out.push_bind_param::<Array<Jsonb>, _>(self.specs)?,
                Seg::Param(_) => out.push_bind_param::<Array<BigInt>, _>(self.seqs)?,
            }
        }
        Ok(())
    }
}

/// The grouped placement commit (`placement::COMMIT_MANY`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CommitMany<'a> {
    pub arrays: &'a crate::placement::GroupArrays,
}

impl QueryId for CommitMany<'_> {
    type QueryId = CommitMany<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl Query for CommitMany<'_> {
    type SqlType = (Text, Nullable<BigInt>, Bool, Nullable<Array<Text>>);
}

impl QueryFragment<Pg> for CommitMany<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let a = self.arrays;
        for seg in segments(crate::placement::COMMIT_MANY) {
            match seg {
                Seg::Text(t) => out.push_sql(t),
                Seg::Param(1) => out.push_bind_param::<Array<Text>, _>(&a.ids)?,
                Seg::Param(2) => out.push_bind_param::<Array<BigInt>, _>(&a.versions)?,
                Seg::Param(3) => out.push_bind_param::<Array<Text>, _>(&a.leaders)?,
                Seg::Param(4) => out.push_bind_param::<Array<Nullable<Text>>, _>(&a.groups)?,
                Seg::Param(5) => out.push_bind_param::<Array<Text>, _>(&a.claim_ids)?,
                Seg::Param(6) => out.push_bind_param::<Array<Text>, _>(&a.claim_workers)?,
                Seg::Param(7) => out.push_bind_param::<Array<Integer>, _>(&a.claim_idxs)?,
                Seg::Param(_) => out.push_bind_param::<Array<BigInt>, _>(&a.claim_bytes)?,
            }
        }
        Ok(())
    }
}

/// The grouped forward reports (`reports::FORWARD_MANY`): parallel arrays.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ForwardMany<'a> {
    pub ids: &'a [&'a str],
    pub versions: &'a [i64],
    pub workers: &'a [&'a str],
    pub states: &'a [&'a str],
    pub endpoints: &'a [Option<&'a str>],
    pub restarts: &'a [i32],
    pub reasons: &'a [Option<&'a str>],
}

impl QueryId for ForwardMany<'_> {
    type QueryId = ForwardMany<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl Query for ForwardMany<'_> {
    type SqlType = (Text, BigInt, Text, BigInt);
}

impl QueryFragment<Pg> for ForwardMany<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        for seg in segments(crate::reports::FORWARD_MANY) {
            match seg {
                Seg::Text(t) => out.push_sql(t),
                Seg::Param(1) => out.push_bind_param::<Array<Text>, _>(self.ids)?,
                Seg::Param(2) => out.push_bind_param::<Array<BigInt>, _>(self.versions)?,
                Seg::Param(3) => out.push_bind_param::<Array<Text>, _>(self.workers)?,
                Seg::Param(4) => out.push_bind_param::<Array<Text>, _>(self.states)?,
                Seg::Param(5) => {
                    out.push_bind_param::<Array<Nullable<Text>>, _>(self.endpoints)?;
                }
                Seg::Param(6) => out.push_bind_param::<Array<Integer>, _>(self.restarts)?,
                Seg::Param(_) => {
                    out.push_bind_param::<Array<Nullable<Text>>, _>(self.reasons)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_split_at_parameters() {
        let segs = segments("a = $1 AND b = ANY($12::int[]) AND c = '$x'");
        let shape: Vec<String> = segs
            .iter()
            .map(|s| match s {
                Seg::Text(t) => format!("T({t})"),
                Seg::Param(n) => format!("P{n}"),
            })
            .collect();
        assert_eq!(
            shape,
            [
                "T(a = )",
                "P1",
                "T( AND b = ANY()",
                "P12",
                "T(::int[]) AND c = '$)",
                "T(x')"
            ]
        );
    }
}
