//! The cluster's identity and this node's place in it: what `bulwark cluster init` and
//! `bulwark cluster join` write to the data folder, the join token, and the TLS
//! configurations built from them.
//!
//! Trust model: `cluster init` creates the cluster's certificate authority (a
//! self-signed CA certificate and its key) and a 128-bit secret. Every node has its own
//! key, made on the node itself, and a certificate the CA issued for it at join that
//! names its node id (`n<ID>.node.bulwark`); only the public key travels. Every TCP
//! link between nodes (control, Raft, replication, forwarding) is TLS with both
//! certificates checked against the CA, and the peer's node id read from its
//! certificate; the cluster state records each node's certificate fingerprint, so a
//! removed node, or anyone holding the CA key, cannot speak as a member. Clients that
//! are not nodes (the CLI, scrapers, joining nodes) pin the CA by the SHA-256
//! fingerprint in the token and then prove themselves with its secret inside the
//! encrypted channel. The token an administrator copies carries both:
//! `bwk1:<secret>:<fingerprint>`, like kubeadm's token plus CA hash.

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
    /// A new cluster certificate authority.
    pub fn generate() -> Result<ClusterCert, IdentityError> {
        let key = rcgen::KeyPair::generate().map_err(tls_err)?;
        let cert = ca_params().self_signed(&key).map_err(tls_err)?;
        Ok(ClusterCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    fn cert_der(&self) -> Result<CertificateDer<'static>, IdentityError> {
        first_cert(&self.cert_pem, "cluster certificate")
    }

    /// SHA-256 fingerprint of the certificate.
    pub fn fingerprint(&self) -> Result<String, IdentityError> {
        Ok(fingerprint(self.cert_der()?.as_ref()))
    }

    /// Issues the certificate of node `node_id` for the public key it made
    /// (`public_key`: an uncompressed P-256 point, as [`NodeKey::public_key`] gives it).
    /// The certificate names the node id and serves as both TLS server and client.
    pub fn issue_node_cert(
        &self,
        node_id: NodeId,
        public_key: &[u8],
    ) -> Result<String, IdentityError> {
        if public_key.len() != 65 || public_key[0] != 4 {
            return Err(IdentityError::Tls(
                "the node's public key is not an uncompressed P-256 point".into(),
            ));
        }
        let ca_key = rcgen::KeyPair::from_pem(&self.key_pem).map_err(tls_err)?;
        // Signing needs the issuer's name and key only: the CA's parameters are
        // fixed, so rebuilding its certificate yields the same issuer.
        let issuer = ca_params().self_signed(&ca_key).map_err(tls_err)?;
        let mut params = rcgen::CertificateParams::new(vec![
            CLUSTER_SERVER_NAME.to_string(),
            node_dns_name(node_id),
        ])
        .map_err(tls_err)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("bulwark node {node_id}"));
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        let cert = params
            .signed_by(&P256PublicKey(public_key.to_vec()), &issuer, &ca_key)
            .map_err(tls_err)?;
        Ok(cert.pem())
    }
}

/// The fixed parameters of a cluster CA certificate.
fn ca_params() -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "bulwark cluster CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn tls_err(e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Tls(e.to_string())
}

fn first_cert(pem: &str, what: &str) -> Result<CertificateDer<'static>, IdentityError> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| IdentityError::Tls(format!("{what} PEM holds no certificate")))
}

/// A node's public key as the CA signs it (ECDSA P-256, the key [`NodeKey`] makes).
struct P256PublicKey(Vec<u8>);

impl rcgen::PublicKeyData for P256PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// The DNS name a node certificate carries for node `id`.
pub fn node_dns_name(id: NodeId) -> String {
    format!("n{id}.node.bulwark")
}

/// What a verified peer certificate says about its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCert {
    /// The node id the certificate names.
    pub node: NodeId,
    /// The subject public key info, DER.
    spki: Vec<u8>,
}

impl PeerCert {
    /// Reads a peer's certificate; it must already have been verified against the
    /// cluster CA (the TLS handshake does that).
    pub fn read(cert: &CertificateDer<'_>) -> Result<PeerCert, String> {
        let ee = webpki::EndEntityCert::try_from(cert)
            .map_err(|e| format!("unreadable certificate: {e}"))?;
        let node = ee
            .valid_dns_names()
            .find_map(|n| {
                n.strip_prefix('n')?
                    .strip_suffix(".node.bulwark")?
                    .parse::<NodeId>()
                    .ok()
            })
            .ok_or_else(|| "the certificate names no node (not a node certificate)".to_string())?;
        Ok(PeerCert {
            node,
            spki: ee.subject_public_key_info().as_ref().to_vec(),
        })
    }

    /// True when the certificate is for `public_key` (hex of the uncompressed point
    /// the node sent at join, as the cluster state records it). A P-256 SPKI ends
    /// with that point.
    pub fn has_key(&self, public_key: &str) -> bool {
        let ours = hex(self
            .spki
            .get(self.spki.len().saturating_sub(65)..)
            .unwrap_or(&[]));
        self.spki.len() > 65 && secrets_match(&ours, &public_key.to_ascii_lowercase())
    }
}

/// Whether the cluster state (as this node has applied it) admits the node that
/// presented `peer`: a member must show the key it joined with; a node id that was
/// handed out and is gone was removed. An id this node has not heard of yet is
/// admitted on the CA's word alone (this node's state is behind: it is joining, or
/// catching up).
pub fn check_member(state: &crate::state::ClusterState, peer: &PeerCert) -> Result<(), String> {
    match state.nodes.get(&peer.node) {
        Some(n) => match &n.public_key {
            Some(k) if !peer.has_key(k) => Err(format!(
                "node {} ({}) showed a certificate for a key other than the one it joined with",
                peer.node, n.name
            )),
            _ => Ok(()),
        },
        None if peer.node < state.next_node_id => Err(format!(
            "node {} was removed from the cluster; its certificate is no longer accepted",
            peer.node
        )),
        None => Ok(()),
    }
}

/// The first certificate of a TLS peer's chain, read as a node's.
pub fn peer_cert(certs: Option<&[CertificateDer<'_>]>) -> Option<Result<PeerCert, String>> {
    certs.and_then(|c| c.first()).map(PeerCert::read)
}

/// A node's own key, made on the node; it never leaves the data folder.
pub struct NodeKey(rcgen::KeyPair);

impl NodeKey {
    /// A new key (ECDSA P-256).
    pub fn generate() -> Result<NodeKey, IdentityError> {
        Ok(NodeKey(rcgen::KeyPair::generate().map_err(tls_err)?))
    }

    /// The public key the CA signs (the uncompressed point).
    pub fn public_key(&self) -> Vec<u8> {
        self.0.public_key_raw().to_vec()
    }

    /// The private key, PEM.
    pub fn pem(&self) -> String {
        self.0.serialize_pem()
    }
}

/// This node's certificate (issued by the cluster CA) and its own key, PEM.
#[derive(Clone, Serialize, Deserialize)]
pub struct NodeCert {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM (PKCS#8).
    pub key_pem: String,
}

impl NodeCert {
    /// The public key of the node's key (hex of the uncompressed point), as the
    /// cluster state records it.
    pub fn public_key_hex(&self) -> Option<String> {
        let key = rustls_pemfile::private_key(&mut self.key_pem.as_bytes()).ok()??;
        let pair = rcgen::KeyPair::try_from(&key).ok()?;
        Some(hex(pair.public_key_raw()))
    }
}

impl std::fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCert")
    }
}

/// The TLS configurations of a node, all with its own certificate.
#[derive(Clone)]
pub struct NodeTls {
    /// Control listener: node certificates are asked for but not required (the CLI
    /// and joining nodes prove themselves with the token instead).
    pub control_server: Arc<rustls::ServerConfig>,
    /// Node-to-node links that only nodes use (replication, forwarding): a node
    /// certificate is required.
    pub link_server: Arc<rustls::ServerConfig>,
    /// HTTPS for browsers and scrapers: no client certificate asked for (browsers
    /// would prompt for one).
    pub https_server: Arc<rustls::ServerConfig>,
    /// Connecting to another node: presents this node's certificate and accepts any
    /// node certificate the CA issued.
    pub client: Arc<rustls::ClientConfig>,
    /// SHA-256 of this node's certificate.
    pub fingerprint: String,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeTls({})", self.fingerprint)
    }
}

impl NodeTls {
    /// The configurations of a node with certificate `node` under the CA `ca`.
    pub fn new(ca: &ClusterCert, node: &NodeCert) -> Result<NodeTls, IdentityError> {
        let ca_der = ca.cert_der()?;
        let cert = first_cert(&node.cert_pem, "node certificate")?;
        let key = || -> Result<PrivateKeyDer<'static>, IdentityError> {
            rustls_pemfile::private_key(&mut node.key_pem.as_bytes())
                .ok()
                .flatten()
                .ok_or_else(|| IdentityError::Tls("node key PEM holds no key".into()))
        };
        let chain = vec![cert.clone(), ca_der.clone()];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_der).map_err(tls_err)?;
        let roots = Arc::new(roots);
        let client_verifier = |optional: bool| {
            let b = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.clone(),
                provider(),
            );
            let b = if optional {
                b.allow_unauthenticated()
            } else {
                b
            };
            b.build().map_err(tls_err)
        };
        let server = |verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>| {
            let b = rustls::ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(tls_err)?;
            let b = match verifier {
                Some(v) => b.with_client_cert_verifier(v),
                None => b.with_no_client_auth(),
            };
            let mut cfg = b.with_single_cert(chain.clone(), key()?).map_err(tls_err)?;
            // No resumption: every connection shows its certificate again, so a
            // revoked node is refused on its next connection.
            cfg.send_tls13_tickets = 0;
            cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            Ok::<_, IdentityError>(Arc::new(cfg))
        };
        let server_verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(tls_err)?;
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_webpki_verifier(server_verifier)
            .with_client_auth_cert(chain.clone(), key()?)
            .map_err(tls_err)?;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(NodeTls {
            control_server: server(Some(client_verifier(true)?))?,
            link_server: server(Some(client_verifier(false)?))?,
            https_server: server(None)?,
            client: Arc::new(client),
            fingerprint: fingerprint(cert.as_ref()),
        })
    }
}

/// Every TLS endpoint speaks TLS 1.3 only: no legacy renegotiation or resumption
/// corners, and the handshake the plaintext replication mode relies on ends with the
/// client's Finished.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS client configuration for a client that knows only the token: it accepts a
/// server whose certificate chains to the CA with `fingerprint`.
pub fn client_config(fingerprint: &str) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCa {
        fingerprint: fingerprint.to_string(),
        provider: provider.clone(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
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

/// Trusts the CA whose fingerprint the token carries: the server sends it after its
/// own certificate, and the chain is then verified as usual (signature, validity,
/// name). Pinning replaces a public CA for a cluster that is its own authority.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| secrets_match(&fingerprint(c.as_ref()), &self.fingerprint))
        else {
            return Err(rustls::Error::General(
                "the server's certificate is not this cluster's (its CA's fingerprint differs from the token)"
                    .into(),
            ));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?
        .verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
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
    /// The cluster CA: certificate and key (every node can admit new nodes).
    pub cert: ClusterCert,
    /// This node's certificate and key. Missing only in identities written before
    /// nodes had their own certificates.
    #[serde(default)]
    pub node_cert: Option<NodeCert>,
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
        {
            use std::os::unix::fs::DirBuilderExt;
            // Only the node reads its keys: the folders on the way are its own too.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io(&dir))?;
        }
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

    /// Key material only nodes hold (a digest of the cluster CA's private key), for
    /// what nodes sign for each other outside TLS (heartbeats). No token yields it.
    pub fn node_secret(&self) -> Vec<u8> {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"bulwark-node-secret:");
        ctx.update(self.cert.key_pem.as_bytes());
        ctx.finish().as_ref().to_vec()
    }

    /// This node's TLS configurations.
    pub fn tls(&self) -> Result<NodeTls, IdentityError> {
        let node = self.node_cert.as_ref().ok_or_else(|| IdentityError::Damaged {
            path: PathBuf::from("identity.json"),
            detail: "it predates per-node certificates (no node certificate); recreate the node: `bulwark node remove`, then join it again with a new --data-dir".into(),
        })?;
        NodeTls::new(&self.cert, node)
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

    fn node(ca: &ClusterCert, id: NodeId) -> NodeCert {
        let key = NodeKey::generate().unwrap();
        NodeCert {
            cert_pem: ca.issue_node_cert(id, &key.public_key()).unwrap(),
            key_pem: key.pem(),
        }
    }

    #[test]
    fn issued_node_certificates_name_their_node() {
        let ca = ClusterCert::generate().unwrap();
        let n7 = node(&ca, 7);
        let der = first_cert(&n7.cert_pem, "x").unwrap();
        let peer = PeerCert::read(&der).unwrap();
        assert_eq!(peer.node, 7);
        let key = rustls_pemfile::private_key(&mut n7.key_pem.as_bytes())
            .unwrap()
            .unwrap();
        let public = rcgen::KeyPair::try_from(&key)
            .unwrap()
            .public_key_raw()
            .to_vec();
        assert!(peer.has_key(&hex(&public)));
        assert!(!peer.has_key(&hex(&NodeKey::generate().unwrap().public_key())));
        let ca_der = ca.cert_der().unwrap();
        assert!(PeerCert::read(&ca_der).is_err(), "the CA is no node");
        NodeTls::new(&ca, &n7).unwrap();
        client_config(&ca.fingerprint().unwrap()).unwrap();
        assert!(ca.issue_node_cert(1, &[4; 10]).is_err());
    }

    /// Runs a TLS handshake in memory; the peer certificates each side saw.
    fn handshake(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> Result<Option<NodeId>, rustls::Error> {
        let mut c = rustls::ClientConnection::new(client, server_name())?;
        let mut s = rustls::ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(peer_cert(s.peer_certificates()).map(|p| p.unwrap().node));
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn nodes_authenticate_each_other_and_strangers_are_refused() {
        let ca = ClusterCert::generate().unwrap();
        let (a, b) = (
            NodeTls::new(&ca, &node(&ca, 1)).unwrap(),
            NodeTls::new(&ca, &node(&ca, 2)).unwrap(),
        );
        assert_eq!(
            handshake(a.client.clone(), b.link_server.clone()),
            Ok(Some(1))
        );
        // A token holder reaches the control listener, without a certificate.
        let token_client = client_config(&ca.fingerprint().unwrap()).unwrap();
        assert_eq!(
            handshake(token_client.clone(), b.control_server.clone()),
            Ok(None)
        );
        assert!(handshake(token_client, b.link_server.clone()).is_err());
        // A node of another cluster: refused both ways.
        let other = ClusterCert::generate().unwrap();
        let stranger = NodeTls::new(&other, &node(&other, 1)).unwrap();
        assert!(handshake(stranger.client.clone(), b.link_server.clone()).is_err());
        assert!(handshake(stranger.client, b.control_server.clone()).is_err());
        assert!(handshake(a.client.clone(), stranger.link_server).is_err());
        let wrong_pin = client_config(&other.fingerprint().unwrap()).unwrap();
        assert!(handshake(wrong_pin, b.control_server.clone()).is_err());
    }
}
