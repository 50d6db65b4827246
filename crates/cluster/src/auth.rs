//! Credentials other than node certificates: API tokens, each with a role, as cluster
//! state. A token is `bwk1:<secret>:<CA fingerprint>`; the cluster keeps only the
//! SHA-256 of its secret, so the state, a snapshot or a backup never yields one.
//!
//! | role      | control port (CLI)                         | HTTPS                       |
//! |-----------|--------------------------------------------|-----------------------------|
//! | `admin`   | everything but what only nodes do          | console with actions, API   |
//! | `viewer`  | state (secrets redacted), status           | console without actions     |
//! | `metrics` | nothing                                    | `/metrics`                  |
//! | `join`    | joining one node (single use, expires)     | nothing                     |
//!
//! Raft, leases, promotions, in-sync changes and reservations are accepted only from
//! node certificates ([`crate::rpc::Request::allowed`]).

use serde::{Deserialize, Serialize};

use crate::identity::{hex, secrets_match};
use crate::state::ClusterState;

/// What a token lets its holder do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Administers the cluster.
    Admin,
    /// Reads status and configuration, with secrets redacted.
    Viewer,
    /// Scrapes `/metrics`.
    Metrics,
    /// Joins one node.
    Join,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
            Role::Metrics => "metrics",
            Role::Join => "join",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "viewer" => Ok(Role::Viewer),
            "metrics" => Ok(Role::Metrics),
            "join" => Ok(Role::Join),
            _ => Err(format!("no role {s:?}: use admin, viewer, metrics or join")),
        }
    }
}

/// The id of the token `cluster init` printed.
pub const INIT_TOKEN_ID: &str = "init";

/// An API token as the cluster keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    /// Short id, for `token list` and `token revoke`.
    pub id: String,
    /// What it may do.
    pub role: Role,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// When it was made (Unix milliseconds, the creating client's clock).
    pub created_unix_ms: u64,
    /// When it stops working, if ever.
    pub expires_unix_ms: Option<u64>,
    /// Good for one use (join tokens).
    pub single_use: bool,
    /// A single-use token that was used.
    #[serde(default)]
    pub used: bool,
    /// Revoked: kept (so `token list` shows it, and the cluster never falls back to
    /// having no tokens), never accepted again.
    #[serde(default)]
    pub revoked: bool,
    /// What it is for, as its maker said.
    #[serde(default)]
    pub comment: String,
}

impl ApiToken {
    /// Why the token is unusable at `now_unix_ms`, if it is.
    pub fn unusable(&self, now_unix_ms: u64) -> Option<String> {
        if self.revoked {
            return Some(format!("token {} was revoked", self.id));
        }
        if self.used {
            return Some(format!("token {} was already used", self.id));
        }
        match self.expires_unix_ms {
            Some(t) if now_unix_ms >= t => Some(format!("token {} has expired", self.id)),
            _ => None,
        }
    }

    /// Why the record cannot be stored, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.id.is_empty()
            || self.id.len() > 32
            || !self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(format!(
                "token id {:?}: use 1 to 32 letters, digits or '-'",
                self.id
            ));
        }
        if self.secret_sha256.len() != 64
            || !self.secret_sha256.chars().all(|c| c.is_ascii_hexdigit())
        {
            return Err("the token's secret digest is not SHA-256 hex".into());
        }
        if self.comment.len() > 200 || self.comment.chars().any(char::is_control) {
            return Err("the token's comment: at most 200 printable characters".into());
        }
        Ok(())
    }
}

/// SHA-256 of a token secret, hex.
pub fn secret_digest(secret: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
}

/// The current time in Unix milliseconds.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A token holder, once authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The token's id.
    pub id: String,
    /// Its role.
    pub role: Role,
}

/// Who holds `secret`, according to `state` at `now_unix_ms`. `init_secret` is the
/// secret `cluster init` made: it counts as the admin token [`INIT_TOKEN_ID`] only
/// while the cluster keeps no tokens at all (a cluster made before tokens were cluster
/// state); otherwise only the recorded tokens count.
pub fn authenticate(
    state: &ClusterState,
    init_secret: &str,
    secret: &str,
    now_unix_ms: u64,
) -> Result<Holder, String> {
    if state.tokens.is_empty() {
        return if secrets_match(secret, init_secret) {
            Ok(Holder {
                id: INIT_TOKEN_ID.into(),
                role: Role::Admin,
            })
        } else {
            Err("unknown token".into())
        };
    }
    let digest = secret_digest(secret);
    // Every record is compared, so the time taken says nothing about which matched.
    let found = state
        .tokens
        .values()
        .fold(None, |found, t| {
            if secrets_match(&t.secret_sha256, &digest) {
                Some(t)
            } else {
                found
            }
        })
        .ok_or_else(|| "unknown or revoked token".to_string())?;
    if let Some(why) = found.unusable(now_unix_ms) {
        return Err(why);
    }
    Ok(Holder {
        id: found.id.clone(),
        role: found.role,
    })
}

/// `state` with every secret taken out: CHAP secrets (user names stay) and token
/// digests. What anyone but a node, or an admin who asked for secrets, gets to see.
pub fn redacted(state: &ClusterState) -> ClusterState {
    let mut st = state.clone();
    for a in st.chap.values_mut() {
        a.secret = REDACTED.into();
        if let Some((_, s)) = &mut a.mutual {
            *s = REDACTED.into();
        }
    }
    for t in st.tokens.values_mut() {
        t.secret_sha256.clear();
    }
    st
}

/// What a redacted secret reads as.
pub const REDACTED: &str = "(redacted)";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;

    fn token(id: &str, role: Role, secret: &str, expires: Option<u64>) -> ApiToken {
        ApiToken {
            id: id.into(),
            role,
            secret_sha256: secret_digest(secret),
            created_unix_ms: 1000,
            expires_unix_ms: expires,
            single_use: role == Role::Join,
            used: false,
            revoked: false,
            comment: String::new(),
        }
    }

    #[test]
    fn tokens_authenticate_by_role_until_revoked_expired_or_used() {
        let mut st = ClusterState::default();
        // A cluster without token records: the init secret is the admin token.
        assert_eq!(
            authenticate(&st, "init-secret", "init-secret", 0)
                .unwrap()
                .role,
            Role::Admin
        );
        assert!(authenticate(&st, "init-secret", "other", 0).is_err());
        for t in [
            token(INIT_TOKEN_ID, Role::Admin, "init-secret", None),
            token("v1", Role::Viewer, "viewer-secret", Some(5000)),
            token("j1", Role::Join, "join-secret", Some(5000)),
        ] {
            st.apply(&Command::CreateToken { token: t }).unwrap();
        }
        let who = |s: &str, now| authenticate(&st, "init-secret", s, now);
        assert_eq!(who("viewer-secret", 4000).unwrap().role, Role::Viewer);
        assert!(who("viewer-secret", 5000).unwrap_err().contains("expired"));
        assert!(who("nothing", 0).is_err());
        st.apply(&Command::UseToken {
            id: "j1".into(),
            now_unix_ms: 2000,
        })
        .unwrap();
        assert!(st
            .apply(&Command::UseToken {
                id: "j1".into(),
                now_unix_ms: 2000
            })
            .is_err());
        assert!(authenticate(&st, "init-secret", "join-secret", 2000)
            .unwrap_err()
            .contains("used"));
        st.apply(&Command::RevokeToken {
            id: INIT_TOKEN_ID.into(),
        })
        .unwrap();
        // Revoked: the init secret no longer counts, though the nodes still know it.
        assert!(authenticate(&st, "init-secret", "init-secret", 0)
            .unwrap_err()
            .contains("revoked"));
        assert!(st
            .apply(&Command::RevokeToken {
                id: INIT_TOKEN_ID.into()
            })
            .is_err());
        let dup = token("v1", Role::Admin, "x", None);
        assert!(st.apply(&Command::CreateToken { token: dup }).is_err());
    }
}
