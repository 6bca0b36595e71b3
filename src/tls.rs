//! HTTPS serving for the webhook (and the aggregated API): rustls with the ring provider,
//! a certificate that is reloaded when its files change (cert-manager rotates them), and
//! an axum Router behind it, HTTP/1.1.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses a PEM certificate chain and private key into what rustls serves.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey> {
    let certs = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .context("the certificate file is not valid PEM")?;
    if certs.is_empty() {
        return Err(anyhow!("the certificate file holds no certificate"));
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .context("the key file is not valid PEM")?
        .ok_or_else(|| anyhow!("the key file holds no private key"))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| anyhow!("the private key cannot be used: {e}"))?;
    Ok(CertifiedKey::new(certs, signing))
}

/// The serving certificate, swapped in place when it changes.
#[derive(Debug)]
pub struct ReloadingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadingCert {
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(ReloadingCert {
            current: RwLock::new(Arc::new(key)),
        })
    }

    pub fn set(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
    }

    /// Loads the files now, then re-reads them whenever their modification time changes. A
    /// broken new pair is logged and the old certificate kept.
    pub fn watch_files(cert: PathBuf, key: PathBuf) -> Result<Arc<Self>> {
        let load = |cert: &Path, key: &Path| -> Result<CertifiedKey> {
            let c = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
            let k = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
            certified_key(&c, &k)
                .with_context(|| format!("loading {} and {}", cert.display(), key.display()))
        };
        let me = Self::new(load(&cert, &key)?);
        let watched = me.clone();
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        tokio::spawn(async move {
            let mut seen: (Option<SystemTime>, Option<SystemTime>) = (mtime(&cert), mtime(&key));
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let now = (mtime(&cert), mtime(&key));
                if now == seen {
                    continue;
                }
                match load(&cert, &key) {
                    Ok(k) => {
                        watched.set(k);
                        seen = now;
                        tracing::info!(cert = %cert.display(), "serving certificate reloaded");
                    }
                    // Half-written files during a rotation: try again at the next tick.
                    Err(e) => tracing::warn!("keeping the previous certificate: {e:#}"),
                }
            }
        });
        Ok(me)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

pub fn server_config(cert: Arc<ReloadingCert>) -> Result<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves `router` over TLS on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    config: rustls::ServerConfig,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()>,
) {
    // One config for good: the sender may go, the receiver keeps its value.
    let (_fixed, configs) = tokio::sync::watch::channel(DynamicConfig {
        config: Arc::new(config),
        close_connections: false,
    });
    serve_dynamic(listener, configs, router, shutdown).await;
}

/// The client certificate chain a connection presented and rustls verified, put into the
/// extensions of each of its requests by [`serve_dynamic`]. Absent: no certificate.
#[derive(Clone, Debug)]
pub struct PeerCertificates(pub Arc<Vec<rustls::pki_types::CertificateDer<'static>>>);

/// A server config that asks for a client certificate and verifies it against `client_ca_pem`
/// when one is presented; connections without one are still accepted (probes, and the
/// handler answers 401 to anything else). A certificate that does not verify fails the
/// handshake.
pub fn server_config_with_client_ca(
    cert: Arc<ReloadingCert>,
    client_ca_pem: &[u8],
) -> Result<rustls::ServerConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls_pemfile::certs(&mut &client_ca_pem[..]) {
        let ca = ca.context("the client CA bundle is not valid PEM")?;
        roots
            .add(ca)
            .map_err(|e| anyhow!("a client CA certificate cannot be used: {e}"))?;
    }
    if roots.is_empty() {
        return Err(anyhow!("the client CA bundle holds no certificate"));
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| anyhow!("building the client certificate verifier: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A server config, and whether connections accepted with it close after each response.
#[derive(Clone)]
pub struct DynamicConfig {
    pub config: Arc<rustls::ServerConfig>,
    pub close_connections: bool,
}

/// How long open connections may take to finish at shutdown.
const DRAIN_FOR: std::time::Duration = std::time::Duration::from_secs(20);

/// Serves `router` over TLS; each new connection uses the latest config of `configs` (a
/// client CA that rotates), and requests carry the verified [`PeerCertificates`] of their
/// connection. With `close_connections` (the apiserver before it knows the client CA) each
/// response says `Connection: close`, so that clients do not keep reusing a connection that
/// can never carry an identity.
pub async fn serve_dynamic(
    listener: TcpListener,
    configs: tokio::sync::watch::Receiver<DynamicConfig>,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    // On shutdown no new connection is taken, and every open one finishes the request it is
    // serving before it closes (kube-apiserver keeps reusing a connection to a pod whose
    // endpoint is already gone: cutting it would refuse an admission mid-flight).
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => {
                let _ = drain_tx.send(true);
                let _ = tokio::time::timeout(DRAIN_FOR, async {
                    while conns.join_next().await.is_some() {}
                })
                .await;
                return;
            }
        };
        let Ok((tcp, peer)) = accepted else {
            // Out of file descriptors or the like: do not spin.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let current = configs.borrow().clone();
        let acceptor = TlsAcceptor::from(current.config);
        let router = if !current.close_connections {
            router.clone()
        } else {
            router.clone().layer(axum::middleware::map_response(
                |mut resp: axum::response::Response| async move {
                    resp.headers_mut().insert(
                        hyper::header::CONNECTION,
                        hyper::header::HeaderValue::from_static("close"),
                    );
                    resp
                },
            ))
        };
        let mut drain = drain_rx.clone();
        conns.spawn(async move {
            match acceptor.accept(tcp).await {
                Ok(tls) => {
                    let router = match tls.get_ref().1.peer_certificates() {
                        Some(chain) if !chain.is_empty() => {
                            let chain = PeerCertificates(Arc::new(
                                chain.iter().map(|c| c.clone().into_owned()).collect(),
                            ));
                            router.layer(axum::Extension(chain))
                        }
                        _ => router,
                    };
                    let service = TowerToHyperService::new(router);
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service);
                    tokio::pin!(conn);
                    let draining = tokio::select! {
                        _ = conn.as_mut() => false,
                        r = drain.wait_for(|d| *d) => r.is_ok(),
                    };
                    if draining {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
                Err(e) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
            }
        });
    }
}
