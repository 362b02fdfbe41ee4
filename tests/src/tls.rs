//! TLS for tests: a test certificate authority made at test time (rcgen) and an in-process
//! TLS-terminating endpoint (tokio-rustls) in front of the broker's plaintext port, so that
//! `amqps://` is tested against real TLS without reconfiguring the shared broker.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig, crypto::ring};
use tokio_util::sync::CancellationToken;

/// A certificate authority of its own for one test.
#[derive(Debug)]
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, issued by a [`TestCa`].
#[derive(Debug)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl TestCa {
    /// A new CA called `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("CA key: {e}"));
        let issuer = CertifiedIssuer::self_signed(params, key)
            .unwrap_or_else(|e| panic!("CA certificate: {e}"));
        Self { issuer }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `names` (DNS names or IP addresses) signed by this CA.
    pub fn issue(&self, names: &[&str]) -> Issued {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params =
            CertificateParams::new(names.clone()).unwrap_or_else(|e| panic!("params: {e}"));
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("key: {e}"));
        let cert = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("certificate: {e}"));
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    /// Writes the CA certificate to `dir/name` and returns the path.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        write(dir, name, &self.pem())
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }
}

impl Issued {
    /// Writes the certificate and the key to `dir/<name>.crt` and `dir/<name>.key`.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        (
            write(dir, &format!("{name}.crt"), &self.cert_pem),
            write(dir, &format!("{name}.key"), &self.key_pem),
        )
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    if let Err(e) = std::fs::write(&path, text) {
        panic!("cannot write {}: {e}", path.display());
    }
    path
}

/// A TLS endpoint on a loopback port that forwards the decrypted stream to the broker; stopped
/// (with every connection through it) when dropped.
#[derive(Debug)]
pub struct TlsEndpoint {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl TlsEndpoint {
    /// Serves `server`'s certificate and forwards to `target` (e.g. `127.0.0.1:5672`). With
    /// `client_ca`, clients must present a certificate signed by it.
    pub async fn start(server: &Issued, client_ca: Option<&TestCa>, target: SocketAddr) -> Self {
        let provider = Arc::new(ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("TLS versions: {e}"));
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                roots
                    .add(ca.der())
                    .unwrap_or_else(|e| panic!("client CA: {e}"));
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .unwrap_or_else(|e| panic!("client verifier: {e}"));
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server.key_der.clone()));
        let config = builder
            .with_single_cert(vec![server.cert_der.clone()], key)
            .unwrap_or_else(|e| panic!("server certificate: {e}"));
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("TLS endpoint cannot listen: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("TLS endpoint address: {e}"));
        let endpoint = Self {
            addr,
            handshakes: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (handshakes, stop) = (endpoint.handshakes.clone(), endpoint.stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((client, _)) = accepted else { continue };
                let (acceptor, handshakes, stop) =
                    (acceptor.clone(), handshakes.clone(), stop.clone());
                tokio::spawn(async move {
                    let Ok(mut client) = acceptor.accept(client).await else {
                        return; // a refused handshake: the client sees the alert
                    };
                    handshakes.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        () = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                    }
                });
            }
        });
        endpoint
    }

    /// `amqps://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        format!("amqps://guest:guest@127.0.0.1:{}/%2f", self.addr.port())
    }

    /// TLS handshakes completed so far (connections that really were TLS).
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

impl Drop for TlsEndpoint {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
