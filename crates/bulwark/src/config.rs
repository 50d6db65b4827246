//! The `bulwark serve` configuration file (TOML) and its checks.
//!
//! Every mistake is reported with the file, the line and what to change: syntax and type
//! errors through the TOML parser's spans, cross-references (a CHAP account a target
//! names but nobody defined, two LUNs with one number) by locating the offending value.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub chap: Vec<ChapSection>,
    #[serde(default)]
    pub target: Vec<TargetSection>,
}

/// `[server]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Commands a session may have outstanding.
    #[serde(default = "default_queue_depth")]
    pub queue_depth: u32,
    /// Idle time before the target pings an initiator, in milliseconds.
    #[serde(default = "default_nop_interval_ms")]
    pub nop_interval_ms: u64,
    /// Time without an answer to a ping before the connection is dropped, in milliseconds.
    #[serde(default = "default_nop_timeout_ms")]
    pub nop_timeout_ms: u64,
    /// Time a login may take, in milliseconds.
    #[serde(default = "default_login_timeout_ms")]
    pub login_timeout_ms: u64,
    /// Connections at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// CHAP accounts (by name) that discovery sessions must authenticate with.
    #[serde(default)]
    pub discovery_chap: Vec<String>,
}

fn default_queue_depth() -> u32 {
    128
}
fn default_nop_interval_ms() -> u64 {
    5_000
}
fn default_nop_timeout_ms() -> u64 {
    15_000
}
fn default_login_timeout_ms() -> u64 {
    15_000
}
fn default_max_connections() -> usize {
    1024
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            queue_depth: default_queue_depth(),
            nop_interval_ms: default_nop_interval_ms(),
            nop_timeout_ms: default_nop_timeout_ms(),
            login_timeout_ms: default_login_timeout_ms(),
            max_connections: default_max_connections(),
            discovery_chap: Vec::new(),
        }
    }
}

/// `[[chap]]`: an account any number of targets can bind.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ChapSection {
    /// Name targets refer to it by.
    pub name: String,
    /// CHAP_N the initiator sends.
    pub user: String,
    /// The initiator's secret.
    pub secret: String,
    /// Mutual CHAP: the name the target answers with.
    pub target_user: Option<String>,
    /// Mutual CHAP: the target's secret.
    pub target_secret: Option<String>,
}

/// `[[target]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSection {
    pub iqn: String,
    pub alias: Option<String>,
    /// `host:port` addresses; each is its own portal group (tag = position + 1).
    pub portals: Vec<String>,
    /// CHAP accounts bound to this target.
    #[serde(default)]
    pub chap: Vec<String>,
    /// Initiator names allowed; absent means every initiator.
    pub allowed_initiators: Option<Vec<String>>,
    /// Let initiators reset the whole target (TARGET WARM/COLD RESET, which ends every
    /// session of it); off by default, as in LIO.
    #[serde(default)]
    pub allow_target_reset: bool,
    #[serde(default)]
    pub lun: Vec<LunSection>,
}

/// `[[target.lun]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LunSection {
    pub lun: u64,
    /// A file (created sparse when missing and `size` is given) or a block device.
    pub path: PathBuf,
    /// Size to create the file with, e.g. "1GiB", "512MiB", "10G" or bytes.
    pub size: Option<String>,
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub direct: bool,
    #[serde(default = "default_true")]
    pub write_cache: bool,
    /// Unit serial number; derived from the target and LUN when absent.
    pub serial: Option<String>,
    /// Physical block size reported to initiators (they align I/O to it).
    #[serde(default = "default_physical_block_size")]
    pub physical_block_size: u32,
    /// Rate limit of SANITIZE, so it never starves the other LUNs; 0 = unlimited.
    #[serde(default = "default_sanitize_bytes_per_s")]
    pub sanitize_bytes_per_s: u64,
}

fn default_physical_block_size() -> u32 {
    4096
}
fn default_sanitize_bytes_per_s() -> u64 {
    16 << 20
}

fn default_block_size() -> u32 {
    512
}
fn default_true() -> bool {
    true
}

/// Parses sizes like `1GiB`, `512M`, `4096`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow!("size {s:?} must start with a number, like \"1GiB\""))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => bail!("size {s:?} has an unknown unit {other:?}; use KiB, MiB, GiB or TiB"),
    };
    n.checked_mul(mult)
        .ok_or_else(|| anyhow!("size {s:?} is too large"))
}

/// Parses a portal address, IPv6 in brackets; the port defaults to 3260.
pub fn parse_portal(s: &str) -> Result<SocketAddr> {
    parse_addr(s, 3260, "portal")
}

/// Parses `IP:PORT`, `IP`, `[IPv6]:PORT` or `[IPv6]`; `what` names it in the error.
pub fn parse_addr(s: &str, default_port: u16, what: &str) -> Result<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let with_port = if s.starts_with('[') || !s.contains(':') {
        format!("{s}:{default_port}")
    } else {
        s.to_string()
    };
    with_port.parse().map_err(|_| {
        anyhow!("{what} {s:?} is not an address like \"127.0.0.1:{default_port}\" or \"[::1]:{default_port}\"")
    })
}

fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read configuration file {}", path.display()))?;
        let cfg: Config = toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|s| {
                    text.get(..s.start)
                        .map(|t| t.matches('\n').count() + 1)
                        .unwrap_or(1)
                })
                .map(|l| format!(", line {l}"))
                .unwrap_or_default();
            anyhow!("{}{}: {}", path.display(), line, e.message())
        })?;
        cfg.check().map_err(|(needle, msg)| {
            let line = needle
                .and_then(|n| line_of(&text, &n))
                .map(|l| format!(", line {l}"))
                .unwrap_or_default();
            anyhow!("{}{}: {}", path.display(), line, msg)
        })?;
        Ok(cfg)
    }

    /// Cross-checks; on error returns a text to locate and the message.
    fn check(&self) -> std::result::Result<(), (Option<String>, String)> {
        let accounts: HashMap<&str, &ChapSection> =
            self.chap.iter().map(|c| (c.name.as_str(), c)).collect();
        if accounts.len() != self.chap.len() {
            let dup = self
                .chap
                .iter()
                .find(|c| self.chap.iter().filter(|d| d.name == c.name).count() > 1);
            let name = dup.map(|c| c.name.clone()).unwrap_or_default();
            return Err((
                Some(format!("\"{name}\"")),
                format!("two CHAP accounts are named {name:?}; rename one"),
            ));
        }
        for c in &self.chap {
            if c.secret.len() < 12 || c.secret.len() > 16 {
                // RFC 7143 §12.1.3 wants at least 96 bits; many initiators refuse longer.
                tracing::warn!(account = %c.name, "CHAP secret should be 12 to 16 characters long");
            }
            if c.target_user.is_some() != c.target_secret.is_some() {
                return Err((
                    Some(c.name.clone()),
                    format!(
                        "CHAP account {:?}: mutual CHAP needs both target_user and target_secret",
                        c.name
                    ),
                ));
            }
        }
        for n in &self.server.discovery_chap {
            if !accounts.contains_key(n.as_str()) {
                return Err((
                    Some(n.clone()),
                    format!("discovery_chap names CHAP account {n:?}, which no [[chap]] defines"),
                ));
            }
        }
        if self.server.queue_depth == 0 || self.server.queue_depth > 4096 {
            return Err((
                Some("queue_depth".into()),
                "queue_depth must be between 1 and 4096".into(),
            ));
        }
        if self.target.is_empty() {
            return Err((
                None,
                "no [[target]] is defined; add one (see examples/bulwark.toml)".into(),
            ));
        }
        let mut iqns = BTreeSet::new();
        for t in &self.target {
            let located = Some(t.iqn.clone());
            if !(t.iqn.starts_with("iqn.")
                || t.iqn.starts_with("eui.")
                || t.iqn.starts_with("naa."))
            {
                return Err((
                    located,
                    format!(
                        "target name {:?} must start with iqn., eui. or naa. (RFC 7143 §4.2.7)",
                        t.iqn
                    ),
                ));
            }
            if t.iqn.len() > 223
                || t.iqn
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_ascii_uppercase())
            {
                return Err((
                    located,
                    format!(
                        "target name {:?} must be lower case, without spaces, at most 223 bytes",
                        t.iqn
                    ),
                ));
            }
            if !iqns.insert(&t.iqn) {
                return Err((located, format!("two targets are named {:?}", t.iqn)));
            }
            if t.portals.is_empty() {
                return Err((
                    located,
                    format!(
                        "target {:?} has no portals; add portals = [\"127.0.0.1:3260\"]",
                        t.iqn
                    ),
                ));
            }
            for p in &t.portals {
                parse_portal(p).map_err(|e| (Some(p.clone()), e.to_string()))?;
            }
            for c in &t.chap {
                if !accounts.contains_key(c.as_str()) {
                    return Err((
                        Some(c.clone()),
                        format!(
                            "target {:?} binds CHAP account {c:?}, which no [[chap]] defines",
                            t.iqn
                        ),
                    ));
                }
            }
            let mut luns = BTreeSet::new();
            if t.lun.is_empty() {
                return Err((located, format!("target {:?} has no [[target.lun]]", t.iqn)));
            }
            for l in &t.lun {
                let where_ = Some(l.path.display().to_string());
                if l.lun > 16383 {
                    return Err((where_, format!("LUN {} is out of range (0..=16383)", l.lun)));
                }
                if !luns.insert(l.lun) {
                    return Err((
                        where_,
                        format!("target {:?} has two LUNs numbered {}", t.iqn, l.lun),
                    ));
                }
                if l.block_size != 512 && l.block_size != 4096 {
                    return Err((
                        Some("block_size".into()),
                        format!(
                            "block_size {} is not supported; use 512 or 4096",
                            l.block_size
                        ),
                    ));
                }
                let p = l.physical_block_size;
                if !p.is_power_of_two() || p < l.block_size || p > 32768 {
                    return Err((
                        Some("physical_block_size".into()),
                        format!("physical_block_size {p} must be a power of two from block_size ({}) to 32768", l.block_size),
                    ));
                }
                if let Some(s) = &l.size {
                    let bytes = parse_size(s).map_err(|e| (Some(s.clone()), e.to_string()))?;
                    if bytes == 0 || bytes % u64::from(l.block_size) != 0 {
                        return Err((
                            Some(s.clone()),
                            format!(
                                "size {s} is not a positive multiple of the {}-byte block",
                                l.block_size
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(s: &str) -> Result<Config> {
        let dir =
            std::env::temp_dir().join(format!("bulwark-config-{}-{}", std::process::id(), s.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bulwark.toml");
        std::fs::write(&p, s).unwrap();
        Config::load(&p)
    }

    #[test]
    fn example_configuration_is_valid() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bulwark.toml");
        let cfg = Config::load(&p).unwrap();
        assert_eq!(cfg.target.len(), 1);
        assert_eq!(cfg.server.queue_depth, 128);
    }

    #[test]
    fn empty_configuration_is_refused() {
        let e = load_str("").unwrap_err().to_string();
        assert!(e.contains("no [[target]]"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("1 parsec").is_err());
    }

    #[test]
    fn portals() {
        assert_eq!(parse_portal("127.0.0.2").unwrap().port(), 3260);
        assert!(parse_portal("[::1]:3261").unwrap().is_ipv6());
        assert!(parse_portal("nonsense:port").is_err());
    }

    #[test]
    fn errors_name_file_and_line() {
        let e = load_str("[server]\nqueue_depth = \"deep\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        let e = load_str("[server]\nqueue_dept = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("queue_dept"), "{e}");
        let text = "[[target]]\niqn = \"iqn.2026-11.io.bulwark:a\"\nportals = [\"127.0.0.1:3260\"]\nchap = [\"ghost\"]\n[[target.lun]]\nlun = 0\npath = \"/tmp/x.img\"\n";
        let e = load_str(text).unwrap_err().to_string();
        assert!(e.contains("line 4") && e.contains("ghost"), "{e}");
    }
}
