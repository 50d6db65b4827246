//! The cluster's identity and this node's place in it: what `bulwark cluster init` and
//! `bulwark cluster join` write to the data folder, the join token, and the TLS
//! configurations built from them.
//!
//! Trust model: `cluster init` creates one self-signed certificate (the cluster's
//! identity) and a 128-bit secret. Every node serves the cluster certificate; every
//! client (peer or CLI) pins it by its SHA-256 fingerprint, so traffic is encrypted and
//! the server is authenticated without a PKI. Clients then prove themselves with the
//! secret inside the encrypted channel. The token an administrator copies carries both:
//! `bwk1:<secret>:<fingerprint>`, like kubeadm's token plus CA hash. A joining node
//! receives the certificate and key over that channel.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};

use crate::state::{NodeAddresses, NodeId};

/// Name in the cluster certificate and the one clients ask for.
pub const CLUSTER_SERVER_NAME: &str = "bulwark-cluster";

/// Errors of identity files and tokens.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The data folder has no cluster identity.
    #[error("{0} holds no cluster identity: run `bulwark cluster init` (first node) or `bulwark cluster join` (other nodes) with this --data-dir first")]
    Missing(PathBuf),
    /// The data folder already has one.
    #[error("{0} already belongs to cluster {1}; use another --data-dir, or `bulwark serve` to run this node")]
    Exists(PathBuf, String),
    /// File access.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file that does not parse.
    #[error("{path} is damaged ({detail}); restore it or rejoin the node")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// A token that does not parse.
    #[error("that is not a Bulwark cluster token (expected bwk1:<32 hex>:<64 hex>, as `bulwark cluster init` printed it)")]
    BadToken,
    /// Certificate generation or TLS set-up failed.
    #[error("TLS: {0}")]
    Tls(String),
}

/// The credential that admits a peer or an administrator, with the fingerprint of the
/// certificate the cluster serves.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// 16 random bytes, hex.
    pub secret: String,
    /// SHA-256 of the cluster certificate (DER), hex.
    pub fingerprint: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token(fingerprint {})", self.fingerprint)
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bwk1:{}:{}", self.secret, self.fingerprint)
    }
}

impl std::str::FromStr for Token {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Token, IdentityError> {
        let mut parts = s.trim().split(':');
        let (Some("bwk1"), Some(secret), Some(fp), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(IdentityError::BadToken);
        };
        let hex = |s: &str, n: usize| s.len() == n && s.chars().all(|c| c.is_ascii_hexdigit());
        if !hex(secret, 32) || !hex(fp, 64) {
            return Err(IdentityError::BadToken);
        }
        Ok(Token {
            secret: secret.to_ascii_lowercase(),
            fingerprint: fp.to_ascii_lowercase(),
        })
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 fingerprint of a DER certificate, hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

/// Compares two secrets in constant time.
pub fn secrets_match(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The cluster certificate and its key, PEM.
#[derive(Clone, Serialize, Deserialize)]
pub struct ClusterCert {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for ClusterCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterCert")
    }
}

impl ClusterCert {
    /// A new self-signed cluster certificate.
    pub fn generate() -> Result<ClusterCert, IdentityError> {
        let ck = rcgen::generate_simple_self_signed(vec![CLUSTER_SERVER_NAME.to_string()])
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        Ok(ClusterCert {
            cert_pem: ck.cert.pem(),
            key_pem: ck.key_pair.serialize_pem(),
        })
    }

    fn cert_der(&self) -> Result<CertificateDer<'static>, IdentityError> {
        rustls_pemfile::certs(&mut self.cert_pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| {
                IdentityError::Tls("cluster certificate PEM holds no certificate".into())
            })
    }

    /// SHA-256 fingerprint of the certificate.
    pub fn fingerprint(&self) -> Result<String, IdentityError> {
        Ok(fingerprint(self.cert_der()?.as_ref()))
    }

    /// TLS server configuration presenting the cluster certificate.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
        let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut self.key_pem.as_bytes())
            .ok()
            .flatten()
            .ok_or_else(|| IdentityError::Tls("cluster key PEM holds no key".into()))?;
        let cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert_der()?], key)
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        Ok(Arc::new(cfg))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS client configuration that accepts only the certificate with `fingerprint`.
pub fn client_config(fingerprint: &str) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCert {
        fingerprint: fingerprint.to_string(),
        algorithms: provider.signature_verification_algorithms,
    });
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// The server name clients ask for.
pub fn server_name() -> ServerName<'static> {
    ServerName::DnsName(
        rustls::pki_types::DnsName::try_from(CLUSTER_SERVER_NAME)
            .map(|n| n.to_owned())
            .unwrap_or_else(|_| unreachable!("constant DNS name")),
    )
}

/// Accepts exactly one certificate: pinning replaces a CA for a cluster that is its own
/// authority. Handshake signatures are still verified, so only the key holder passes.
#[derive(Debug)]
struct PinnedCert {
    fingerprint: String,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if secrets_match(&fingerprint(end_entity.as_ref()), &self.fingerprint) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the server's certificate is not this cluster's (fingerprint differs from the token)"
                    .into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// This node's identity, as stored in `<data-dir>/cluster/identity.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Identity {
    /// Random id of the cluster (hex), shown in status.
    pub cluster_id: String,
    /// This node's Raft id.
    pub node_id: NodeId,
    /// This node's name.
    pub name: String,
    /// Where this node listens.
    pub addresses: NodeAddresses,
    /// The cluster secret (hex).
    pub secret: String,
    /// The cluster certificate and key.
    pub cert: ClusterCert,
    /// Control addresses of other members at join time, to find the cluster again.
    pub seeds: Vec<std::net::SocketAddr>,
    /// True on the node that created the cluster, until Raft is initialised.
    pub bootstrap: bool,
}

impl Identity {
    /// `<data-dir>/cluster`.
    pub fn dir(data_dir: &Path) -> PathBuf {
        data_dir.join("cluster")
    }

    fn file(data_dir: &Path) -> PathBuf {
        Identity::dir(data_dir).join("identity.json")
    }

    /// True when `data_dir` holds an identity.
    pub fn exists(data_dir: &Path) -> bool {
        Identity::file(data_dir).exists()
    }

    /// Loads the identity of the node whose data folder is `data_dir`.
    pub fn load(data_dir: &Path) -> Result<Identity, IdentityError> {
        let path = Identity::file(data_dir);
        let text = std::fs::read(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                IdentityError::Missing(data_dir.to_path_buf())
            } else {
                IdentityError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        serde_json::from_slice(&text).map_err(|e| IdentityError::Damaged {
            path,
            detail: e.to_string(),
        })
    }

    /// Writes the identity (mode 0600: it holds the cluster key and secret).
    pub fn save(&self, data_dir: &Path) -> Result<(), IdentityError> {
        let dir = Identity::dir(data_dir);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let path = Identity::file(data_dir);
        let tmp = path.with_extension("json.tmp");
        let json =
            serde_json::to_vec_pretty(self).map_err(|e| IdentityError::Tls(e.to_string()))?;
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io(&tmp))?;
            f.write_all(&json).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok(())
    }

    /// The token that admits peers and administrators to this cluster.
    pub fn token(&self) -> Result<Token, IdentityError> {
        Ok(Token {
            secret: self.secret.clone(),
            fingerprint: self.cert.fingerprint()?,
        })
    }
}

/// 16 random bytes, hex.
pub fn random_hex16() -> String {
    let b: [u8; 16] = rand::random();
    hex(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip_and_rejects() {
        let t = Token {
            secret: random_hex16(),
            fingerprint: fingerprint(b"x"),
        };
        let parsed: Token = t.to_string().parse().unwrap();
        assert_eq!(parsed, t);
        for bad in [
            "",
            "bwk1:zz:00",
            "bwk2:00:00",
            &format!("{t}:extra"),
            "bwk1:0011",
        ] {
            assert!(bad.parse::<Token>().is_err(), "{bad}");
        }
    }

    #[test]
    fn constant_time_compare() {
        assert!(secrets_match("abc", "abc"));
        assert!(!secrets_match("abc", "abd"));
        assert!(!secrets_match("abc", "abcd"));
    }

    #[test]
    fn generated_cert_builds_configs() {
        let c = ClusterCert::generate().unwrap();
        c.server_config().unwrap();
        client_config(&c.fingerprint().unwrap()).unwrap();
    }
}
