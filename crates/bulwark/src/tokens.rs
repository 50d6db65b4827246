//! `bulwark cluster token create|list|revoke`: API tokens with roles ([`cluster::auth`]).

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use cluster::state::Command;
use cluster::Token;

use crate::admin::{format_time, print_json, Conn};

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Makes a token with a role and prints it (only now: the cluster keeps a digest).
    Create {
        /// admin (everything), viewer (status and console, no changes, no secrets),
        /// metrics (/metrics only) or join (joins one node).
        #[arg(long)]
        role: cluster::auth::Role,
        /// Lifetime, like 30d, 12h or 90m; "never" for none. Default: 1h for join
        /// tokens, never for the others.
        #[arg(long)]
        expires: Option<String>,
        /// What it is for (shown by `token list`).
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Lists the tokens (never their secrets).
    List,
    /// Revokes a token: refused at once on every node, also on open connections.
    Revoke {
        /// Its id, as `token list` shows it.
        id: String,
    },
}

/// A lifetime like 30d, 12h, 90m or 45s.
fn parse_lifetime(s: &str) -> Result<Option<Duration>> {
    if s == "never" {
        return Ok(None);
    }
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| anyhow!("--expires {s:?}: use a number and d, h, m or s, like 30d"))?;
    let secs = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => bail!("--expires {s:?}: use a number and d, h, m or s, like 30d"),
    };
    Ok(Some(Duration::from_secs(n.saturating_mul(secs))))
}

/// `bulwark cluster token create|list|revoke`.
pub async fn token(conn: &Conn, cmd: TokenCmd) -> Result<()> {
    use cluster::auth::{ApiToken, Role};
    match cmd {
        TokenCmd::Create {
            role,
            expires,
            comment,
        } => {
            let lifetime = match expires {
                Some(e) => parse_lifetime(&e)?,
                None if role == Role::Join => Some(Duration::from_secs(3600)),
                None => None,
            };
            let secret = cluster::identity::random_hex16();
            let now = cluster::auth::now_unix_ms();
            let record = ApiToken {
                id: cluster::identity::random_hex16()[..8].to_string(),
                role,
                secret_sha256: cluster::auth::secret_digest(&secret),
                created_unix_ms: now,
                expires_unix_ms: lifetime.map(|l| now.saturating_add(l.as_millis() as u64)),
                single_use: role == Role::Join,
                used: false,
                revoked: false,
                comment,
            };
            let token = Token {
                secret,
                fingerprint: conn.ca_fingerprint()?,
            };
            let id = record.id.clone();
            let expires_unix_ms = record.expires_unix_ms;
            if let Err(refused) = conn
                .client()?
                .write(Command::CreateToken { token: record })
                .await?
            {
                bail!("refused: {refused}");
            }
            if conn.json {
                return print_json(&serde_json::json!({
                    "id": id,
                    "role": role,
                    "token": token.to_string(),
                    "expires_unix_ms": expires_unix_ms,
                }));
            }
            println!("{token}");
            eprintln!(
                "token {id}: role {role}, {}; shown only now (revoke: bulwark cluster token revoke {id})",
                match expires_unix_ms {
                    Some(t) => format!("expires {}", format_time(t)),
                    None => "does not expire".into(),
                }
            );
            Ok(())
        }
        TokenCmd::List => {
            let st = conn.client()?.state().await?;
            let now = cluster::auth::now_unix_ms();
            if conn.json {
                let rows: Vec<serde_json::Value> = st
                    .tokens
                    .values()
                    .map(|t| {
                        serde_json::json!({
                            "id": t.id,
                            "role": t.role,
                            "created_unix_ms": t.created_unix_ms,
                            "expires_unix_ms": t.expires_unix_ms,
                            "single_use": t.single_use,
                            "status": t.unusable(now).unwrap_or_else(|| "valid".into()),
                            "comment": t.comment,
                        })
                    })
                    .collect();
                return print_json(&rows);
            }
            println!(
                "{:<10} {:<8} {:<20} {:<20} {:<30} COMMENT",
                "ID", "ROLE", "CREATED", "EXPIRES", "STATUS"
            );
            for t in st.tokens.values() {
                println!(
                    "{:<10} {:<8} {:<20} {:<20} {:<30} {}",
                    t.id,
                    t.role.to_string(),
                    format_time(t.created_unix_ms),
                    t.expires_unix_ms
                        .map(format_time)
                        .unwrap_or_else(|| "never".into()),
                    t.unusable(now).unwrap_or_else(|| {
                        if t.single_use {
                            "valid (single use)".into()
                        } else {
                            "valid".into()
                        }
                    }),
                    t.comment
                );
            }
            Ok(())
        }
        TokenCmd::Revoke { id } => {
            match conn
                .client()?
                .write(Command::RevokeToken { id: id.clone() })
                .await?
            {
                Ok(_) => {
                    if conn.json {
                        return print_json(&serde_json::json!({ "revoked": id }));
                    }
                    println!("token {id} revoked; every node refuses it from now on");
                    Ok(())
                }
                Err(refused) => bail!("refused: {refused}"),
            }
        }
    }
}
