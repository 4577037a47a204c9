//! TLS of the gRPC port: a certificate and its key, and with mutual TLS the
//! CA that signs client certificates, all from PEM files.
//!
//! The files are read again when their contents change (checked every
//! [`CHECK_EVERY`]) or on SIGHUP, so a certificate rotated by cert-manager or
//! Vault needs no restart. A new connection gets the newest configuration;
//! open connections keep the one they were made with. Files that cannot be
//! used (half written, a key that does not match) leave the last good
//! configuration in place, and the failure is logged and counted.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::TlsAcceptor;

/// How often the files are compared with what is loaded.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Longest a client may take to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest PEM file read: a certificate chain is a few kilobytes.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Where the PEM files are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With it, clients must present a certificate this CA signed.
    pub client_ca: Option<PathBuf>,
}

/// Why the files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than 1 MiB")]
    TooLarge { path: PathBuf },
    #[error("{path} holds no PEM {what}")]
    Missing { path: PathBuf, what: &'static str },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("the certificate and key cannot be used together: {0}")]
    Config(#[source] rustls::Error),
}

/// The TLS of a listener, following its files.
#[derive(Debug)]
pub struct Tls {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Loaded>,
}

struct Loaded {
    acceptor: TlsAcceptor,
    contents: Contents,
    /// When the server's certificate expires, in seconds since the epoch.
    not_after: i64,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The bytes of the files, to tell whether they changed.
#[derive(PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Tls {
    /// Reads the files; an error names the file and what is wrong with it.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let contents = read(&files)?;
        let loaded = build(&files, &provider, contents)?;
        Ok(Self {
            files,
            provider,
            current: RwLock::new(loaded),
        })
    }

    /// What a new connection's handshake uses.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current.read().expect("tls lock").acceptor.clone()
    }

    /// When the certificate in use expires, in seconds since the epoch.
    pub fn not_after(&self) -> i64 {
        self.current.read().expect("tls lock").not_after
    }

    /// Reads the files again; `Ok(true)` when they changed and are now in
    /// use, `Ok(false)` when they are as loaded.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let contents = read(&self.files)?;
        if self.current.read().expect("tls lock").contents == contents {
            return Ok(false);
        }
        let loaded = build(&self.files, &self.provider, contents)?;
        *self.current.write().expect("tls lock") = loaded;
        Ok(true)
    }

    /// Reloads when the files change or on SIGHUP, until dropped; reports
    /// every reload that changed something, or failed, to `reported`.
    pub async fn follow(self: Arc<Self>, reported: impl Fn(&Result<(), TlsError>)) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = signal(SignalKind::hangup()).ok();
        let mut every = tokio::time::interval(CHECK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A bad file is logged once, not every second until it is fixed.
        let mut last_failure: Option<String> = None;
        loop {
            let hangup = async {
                match hangups.as_mut() {
                    Some(hangups) => hangups.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = every.tick() => {}
                _ = hangup => tracing::info!("SIGHUP: reading the TLS files again"),
            }
            match self.reload() {
                Ok(false) => {}
                Ok(true) => {
                    last_failure = None;
                    tracing::info!(
                        cert = %self.files.cert.display(),
                        "TLS files changed: new connections use them"
                    );
                    reported(&Ok(()));
                }
                Err(error) => {
                    let message = error.to_string();
                    if last_failure.as_deref() != Some(&message) {
                        tracing::warn!(%error, "cannot use the new TLS files; keeping the ones loaded");
                        reported(&Err(error));
                        last_failure = Some(message);
                    }
                }
            }
        }
    }
}

/// The name of the client that presented `cert`: its subject's common name,
/// else its first URI subject alternative name (a SPIFFE id), else its first
/// DNS name.
pub fn client_name(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::{extensions::GeneralName, prelude::FromDer};
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok())
    {
        return Some(cn.to_owned());
    }
    let names = cert.subject_alternative_name().ok().flatten()?;
    let general = &names.value.general_names;
    general
        .iter()
        .find_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .or_else(|| {
            general.iter().find_map(|name| match name {
                GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                _ => None,
            })
        })
}

fn read(files: &TlsFiles) -> Result<Contents, TlsError> {
    Ok(Contents {
        cert: read_file(&files.cert)?,
        key: read_file(&files.key)?,
        client_ca: files.client_ca.as_deref().map(read_file).transpose()?,
    })
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let failed = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(failed)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(failed)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(TlsError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

fn build(
    files: &TlsFiles,
    provider: &Arc<CryptoProvider>,
    contents: Contents,
) -> Result<Loaded, TlsError> {
    let invalid = |path: &Path, error: &dyn std::fmt::Display| TlsError::Invalid {
        path: path.to_owned(),
        message: error.to_string(),
    };
    let chain = CertificateDer::pem_slice_iter(&contents.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(&files.cert, &e))?;
    let leaf = chain.first().ok_or_else(|| TlsError::Missing {
        path: files.cert.clone(),
        what: "certificate",
    })?;
    let not_after = {
        use x509_parser::prelude::FromDer;
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(leaf)
            .map_err(|e| invalid(&files.cert, &e))?;
        parsed.validity().not_after.timestamp()
    };
    let key = PrivateKeyDer::from_pem_slice(&contents.key).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::Missing {
            path: files.key.clone(),
            what: "private key",
        },
        e => invalid(&files.key, &e),
    })?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?;
    let builder = match (&files.client_ca, &contents.client_ca) {
        (Some(path), Some(pem)) => {
            builder.with_client_cert_verifier(client_verifier(path, pem, provider)?)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(TlsError::Config)?;
    // HTTP/2 for gRPC; HTTP/1.1 for gRPC-Web from browsers that ask for it.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Loaded {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        contents,
        not_after,
    })
}

fn client_verifier(
    path: &Path,
    pem: &[u8],
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let invalid = |message: String| TlsError::Invalid {
        path: path.to_owned(),
        message,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| invalid(e.to_string()))?;
        roots.add(cert).map_err(|e| invalid(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsError::Missing {
            path: path.to_owned(),
            what: "CA certificate",
        });
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
        .build()
        .map_err(|e| invalid(e.to_string()))
}

/// A listener whose connections are TLS, for the `/metrics` endpoint
/// (`--metrics-tls`). Handshakes run one at a time, each bounded by
/// [`SCRAPE_HANDSHAKE_TIMEOUT`]: a scraper's load, not a client's.
#[derive(Debug)]
pub struct TlsListener {
    pub tcp: tokio::net::TcpListener,
    pub tls: Arc<Tls>,
}

/// Longest a scraper may take to finish its handshake.
pub const SCRAPE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = match self.tcp.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::debug!(%error, "metrics endpoint: cannot accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let handshake = self.tls.acceptor().accept(stream);
            match tokio::time::timeout(SCRAPE_HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(stream)) => return (stream, addr),
                Ok(Err(error)) => {
                    tracing::debug!(%addr, %error, "metrics endpoint: TLS handshake failed")
                }
                Err(_) => tracing::debug!(%addr, "metrics endpoint: TLS handshake took too long"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
