//! API keys for the gateway: made here, kept as SHA-256 digests, never stored in clear.
//!
//! A key is 256 bits from the operating system's random source (through `rand`'s thread
//! generator, a CSPRNG seeded from it), written `berth_` + 64 hex digits. Such a key cannot
//! be guessed, so one fast hash is enough to keep a stolen table from being a list of keys.

use crate::{Store, StoreError, schema::api_keys};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use sha2::{Digest, Sha256};
use std::fmt;

/// Where a key may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// The OpenAI-compatible API (`/v1`).
    Inference,
    /// Everything: `/v1` and the management API (`/api/v1`).
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Inference => "inference",
            Scope::Admin => "admin",
        }
    }

    /// Whether a key of this scope may do what `needed` asks.
    pub fn allows(self, needed: Scope) -> bool {
        self == Scope::Admin || needed == Scope::Inference
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Scope, String> {
        match s {
            "inference" => Ok(Scope::Inference),
            "admin" => Ok(Scope::Admin),
            other => Err(format!("unknown scope {other:?} (inference or admin)")),
        }
    }
}

/// What a key starts with.
pub const KEY_PREFIX: &str = "berth_";
/// Characters of a key kept in clear to tell keys apart in a list.
const SHOWN: usize = KEY_PREFIX.len() + 6;
/// The longest key name.
pub const MAX_NAME: usize = 64;

/// A freshly made key: the secret (shown once) and what the table keeps.
#[derive(Clone)]
pub struct NewKey {
    pub secret: String,
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewKey")
            .field("prefix", &self.prefix())
            .finish()
    }
}

impl NewKey {
    pub fn generate() -> NewKey {
        let bytes: [u8; 32] = rand::random();
        let mut secret = String::with_capacity(KEY_PREFIX.len() + 64);
        secret.push_str(KEY_PREFIX);
        for b in bytes {
            secret.push_str(&format!("{b:02x}"));
        }
        NewKey { secret }
    }

    pub fn prefix(&self) -> &str {
        self.secret.get(..SHOWN).unwrap_or(KEY_PREFIX)
    }
}

/// The digest the table keeps of a key (and that a presented key is compared by).
pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A key as listed: never the secret.
#[derive(Debug, Clone, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = api_keys)]
pub struct KeyRow {
    pub id: i64,
    pub name: String,
    pub scope: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A live key as the gateway checks it.
#[derive(Debug, Clone)]
pub struct LiveKey {
    pub name: String,
    pub scope: Scope,
    pub digest: [u8; 32],
}

/// A name for a key: printable, short, no surrounding space.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!("a key name has 1 to {MAX_NAME} bytes"));
    }
    if name.chars().any(|c| c.is_control()) || name.trim() != name {
        return Err("a key name has no control characters and no surrounding space".into());
    }
    Ok(())
}

impl Store {
    /// Records a new key under `name`; refused when a live key has that name already.
    pub async fn create_key(
        &self,
        name: &str,
        scope: Scope,
        key: &NewKey,
    ) -> Result<KeyRow, StoreError> {
        validate_name(name).map_err(StoreError::Invalid)?;
        let mut conn = self.conn().await?;
        let inserted = diesel::insert_into(api_keys::table)
            .values((
                api_keys::name.eq(name),
                api_keys::scope.eq(scope.as_str()),
                api_keys::prefix.eq(key.prefix()),
                api_keys::hash.eq(digest(&key.secret).to_vec()),
            ))
            .returning(KeyRow::as_returning())
            .get_result(&mut conn)
            .await;
        match inserted {
            Err(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::UniqueViolation,
                _,
            )) => Err(StoreError::Invalid(format!(
                "a live key named {name:?} exists already (revoke it first)"
            ))),
            other => Ok(other?),
        }
    }

    /// Every key, live and revoked, oldest first.
    pub async fn keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(api_keys::table
            .select(KeyRow::as_select())
            .order(api_keys::id)
            .load(&mut conn)
            .await?)
    }

    /// The keys that open the gateway now.
    pub async fn live_keys(&self) -> Result<Vec<LiveKey>, StoreError> {
        let mut conn = self.conn().await?;
        let rows: Vec<(String, String, Vec<u8>)> = api_keys::table
            .filter(api_keys::revoked_at.is_null())
            .select((api_keys::name, api_keys::scope, api_keys::hash))
            .load(&mut conn)
            .await?;
        rows.into_iter()
            .map(|(name, scope, hash)| {
                let scope = scope.parse().map_err(StoreError::Corrupt)?;
                let digest = <[u8; 32]>::try_from(hash.as_slice())
                    .map_err(|_| StoreError::Corrupt(format!("key {name:?}: digest length")))?;
                Ok(LiveKey {
                    name,
                    scope,
                    digest,
                })
            })
            .collect()
    }

    /// Revokes the live key named `name`; false when there is none.
    pub async fn revoke_key(&self, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let n = diesel::update(api_keys::table)
            .filter(api_keys::name.eq(name))
            .filter(api_keys::revoked_at.is_null())
            .set(api_keys::revoked_at.eq(diesel::dsl::now))
            .execute(&mut conn)
            .await?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_their_digest_is_stable() {
        let a = NewKey::generate();
        let b = NewKey::generate();
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.secret.len(), KEY_PREFIX.len() + 64);
        assert!(a.secret.starts_with(KEY_PREFIX));
        assert_eq!(digest(&a.secret), digest(&a.secret.clone()));
        assert_ne!(digest(&a.secret), digest(&b.secret));
        assert_eq!(a.prefix().len(), SHOWN);
        assert!(!format!("{a:?}").contains(&a.secret));
    }

    #[test]
    fn an_admin_key_does_everything_an_inference_key_only_inference() {
        assert!(Scope::Admin.allows(Scope::Admin));
        assert!(Scope::Admin.allows(Scope::Inference));
        assert!(Scope::Inference.allows(Scope::Inference));
        assert!(!Scope::Inference.allows(Scope::Admin));
        assert_eq!("admin".parse::<Scope>(), Ok(Scope::Admin));
        assert!("root".parse::<Scope>().is_err());
    }

    #[test]
    fn bad_key_names_are_refused() {
        assert!(validate_name("ci").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name(" x").is_err());
        assert!(validate_name("a\u{0}b").is_err());
        assert!(validate_name(&"x".repeat(65)).is_err());
    }
}
