//! The two counters berth orders everything by, as types of their own: a command's sequence
//! (its position in `BERTH_CMD`, from JetStream) and an instance's version (bumped by every
//! command applied to it). Both travel as plain integers on the wire; PostgreSQL keeps them
//! as `bigint`, and the conversion to and from it is here, once.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A command's stream sequence: the newer command has the higher one.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[cfg_attr(
    feature = "diesel",
    derive(diesel::expression::AsExpression, diesel::deserialize::FromSqlRow)
)]
#[cfg_attr(feature = "diesel", diesel(sql_type = diesel::sql_types::BigInt))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(transparent)]
pub struct CmdSeq(u64);

impl CmdSeq {
    pub const fn new(seq: u64) -> Self {
        CmdSeq(seq)
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    /// As PostgreSQL stores it (`bigint`). A JetStream sequence past 2^63 − 1 (not reachable
    /// in practice) is kept as the largest one, so it still orders after every other.
    pub fn to_db(self) -> i64 {
        i64::try_from(self.0).unwrap_or(i64::MAX)
    }

    /// From PostgreSQL's `bigint` (never negative there; a negative one reads as 0).
    pub fn from_db(seq: i64) -> Self {
        CmdSeq(u64::try_from(seq).unwrap_or(0))
    }
}

impl From<u64> for CmdSeq {
    fn from(seq: u64) -> Self {
        CmdSeq(seq)
    }
}

impl fmt::Display for CmdSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An instance's version. Every applied command bumps it; placements, assignments and
/// reports carry the version they belong to, and only the current one counts.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[cfg_attr(
    feature = "diesel",
    derive(diesel::expression::AsExpression, diesel::deserialize::FromSqlRow)
)]
#[cfg_attr(feature = "diesel", diesel(sql_type = diesel::sql_types::BigInt))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(transparent)]
pub struct Version(i64);

impl Version {
    /// The version of an instance's first command.
    pub const FIRST: Version = Version(1);

    pub const fn new(version: i64) -> Self {
        Version(version)
    }

    pub const fn get(self) -> i64 {
        self.0
    }

    /// The version after this one (a stop that fences a stale placement names it).
    pub const fn next(self) -> Version {
        Version(self.0.saturating_add(1))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Both are `bigint` columns: written and read as PostgreSQL's 8-byte big-endian integers.
#[cfg(feature = "diesel")]
mod sql {
    use super::{CmdSeq, Version};
    use diesel::{
        deserialize::{self, FromSql},
        pg::{Pg, PgValue},
        serialize::{self, IsNull, Output, ToSql},
        sql_types::BigInt,
    };
    use std::io::Write;

    fn write(v: i64, out: &mut Output<'_, '_, Pg>) -> serialize::Result {
        out.write_all(&v.to_be_bytes())?;
        Ok(IsNull::No)
    }

    impl ToSql<BigInt, Pg> for CmdSeq {
        fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
            write(self.to_db(), out)
        }
    }

    impl FromSql<BigInt, Pg> for CmdSeq {
        fn from_sql(bytes: PgValue<'_>) -> deserialize::Result<Self> {
            <i64 as FromSql<BigInt, Pg>>::from_sql(bytes).map(CmdSeq::from_db)
        }
    }

    impl ToSql<BigInt, Pg> for Version {
        fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
            write(self.0, out)
        }
    }

    impl FromSql<BigInt, Pg> for Version {
        fn from_sql(bytes: PgValue<'_>) -> deserialize::Result<Self> {
            <i64 as FromSql<BigInt, Pg>>::from_sql(bytes).map(Version)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_form_keeps_the_order() {
        assert_eq!(CmdSeq::new(7).to_db(), 7);
        assert_eq!(CmdSeq::from_db(7), CmdSeq::new(7));
        assert_eq!(CmdSeq::new(u64::MAX).to_db(), i64::MAX);
        assert!(CmdSeq::from_db(CmdSeq::new(u64::MAX).to_db()) > CmdSeq::new(1 << 62));
        assert_eq!(CmdSeq::from_db(-1), CmdSeq::new(0));
        assert_eq!(Version::new(i64::MAX).next(), Version::new(i64::MAX));
        assert_eq!(Version::FIRST.next(), Version::new(2));
    }

    #[test]
    fn both_travel_as_plain_integers() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct M {
            seq: CmdSeq,
            version: Version,
        }
        #[derive(Serialize)]
        struct Plain {
            seq: i64,
            version: i64,
        }
        let m = M {
            seq: CmdSeq::new(42),
            version: Version::new(3),
        };
        let bytes = crate::encode(&m).unwrap();
        assert_eq!(
            bytes,
            crate::encode(&Plain {
                seq: 42,
                version: 3
            })
            .unwrap()
        );
        assert_eq!(crate::decode::<M>(&bytes).unwrap(), m);
    }
}
