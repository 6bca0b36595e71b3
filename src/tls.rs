//! HTTPS serving for the webhook (and the aggregated API): rustls with the ring provider,
//! a certificate that is reloaded when its files change (cert-manager rotates them), and
//! an axum Router behind it, HTTP/1.1, with timeouts, a connection cap and a drain at
//! shutdown (see [`serve_with`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow};
use hyper_util::rt::{TokioIo, TokioTimer};
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

/// How one HTTPS server defends itself against slow, idle or too many clients, and how it
/// stops. Flattened into the arguments of each server that uses [`serve_with`].
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Longest a client may take to complete the TLS handshake (e.g. `10s`, `500ms`).
    #[arg(long, env = "VM_DHCP_TLS_HANDSHAKE_TIMEOUT", value_parser = parse_duration,
          default_value = "10s")]
    pub tls_handshake_timeout: Duration,
    /// Longest a client may take to send a request's headers, counted from the handshake or
    /// from its previous response (so an idle keep-alive connection is closed after it too),
    /// and then again to send the request's body.
    #[arg(long, env = "VM_DHCP_HEADER_READ_TIMEOUT", value_parser = parse_duration,
          default_value = "30s")]
    pub header_read_timeout: Duration,
    /// Most connections open at once. At the cap a new connection closes the one that has
    /// been idle (handshaking, or waiting for a request) the longest, one that never carried a
    /// request first; when every one is busy, accepting waits until one ends.
    #[arg(long, env = "VM_DHCP_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// After SIGTERM: how long /readyz fails while requests are still served, before
    /// draining starts (the chart's preStop sleep comes before SIGTERM).
    #[arg(long, env = "VM_DHCP_SHUTDOWN_DELAY", value_parser = parse_duration,
          default_value = "2s")]
    pub shutdown_delay: Duration,
    /// While draining: how long requests in flight may take to finish; idle connections
    /// close at once and no new one is accepted.
    #[arg(long, env = "VM_DHCP_DRAIN_TIMEOUT", value_parser = parse_duration,
          default_value = "15s")]
    pub drain_timeout: Duration,
}

pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;

impl Default for ServeArgs {
    fn default() -> Self {
        ServeArgs {
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            shutdown_delay: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(15),
        }
    }
}

/// `10s`, `250ms`, `2m` or a number of seconds (`1.5`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 10s, 500ms or 2m"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        other => return Err(format!("unknown unit {other:?} in {text:?} (ms, s or m)")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("{text:?}: {e}"))
}

/// Whether the server has been told to stop: `/readyz` answers 503 from then on, so the
/// Pod leaves its Service's endpoints before its connections are drained.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn draining(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn start_draining(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// A `/readyz` handler: 200 `ok` until shutdown starts, then 503.
    pub fn handler(&self) -> axum::routing::MethodRouter {
        let me = self.clone();
        axum::routing::get(move || {
            let draining = me.draining();
            async move {
                if draining {
                    (hyper::StatusCode::SERVICE_UNAVAILABLE, "shutting down")
                } else {
                    (hyper::StatusCode::OK, "ok")
                }
            }
        })
    }
}

/// Serves `router` over TLS on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    config: rustls::ServerConfig,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()>,
    limits: &ServeArgs,
    readiness: Readiness,
) {
    // One config for good: the sender may go, the receiver keeps its value.
    let (_fixed, configs) = tokio::sync::watch::channel(DynamicConfig {
        config: Arc::new(config),
        close_connections: false,
    });
    serve_with(listener, configs, router, shutdown, limits, readiness).await;
}

/// The client certificate chain a connection presented and rustls verified, put into the
/// extensions of each of its requests by [`serve_with`]. Absent: no certificate.
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

/// One open connection, as the cap sees it.
#[derive(Debug)]
struct Conn {
    /// Requests whose response is not yet fully written.
    busy: AtomicUsize,
    /// Whether a request ever came on it: a client's pooled connection, idle between its
    /// requests, is closed at the cap only when no connection that never carried one is left
    /// (closing it races the client's next request, which then fails).
    served: AtomicBool,
    /// When it last became idle (accepted, or its last response written).
    idle_since: Mutex<Instant>,
    /// Told to close because the cap needs its place.
    evict: tokio::sync::Notify,
}

/// The open connections, for choosing which one to close at the cap.
#[derive(Debug, Default)]
struct Conns {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Conns {
    fn add(self: &Arc<Self>) -> ConnHandle {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            busy: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            evict: tokio::sync::Notify::new(),
        });
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, conn.clone());
        ConnHandle {
            id,
            conn,
            conns: self.clone(),
        }
    }

    /// Tells the connection idle the longest to close, one that never carried a request if
    /// there is any; false when every one is busy.
    fn evict_oldest_idle(&self) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = open
            .iter()
            .filter(|(_, c)| c.busy.load(Ordering::SeqCst) == 0)
            .min_by_key(|(_, c)| {
                (
                    c.served.load(Ordering::SeqCst),
                    *c.idle_since.lock().unwrap_or_else(|e| e.into_inner()),
                )
            })
            .map(|(id, _)| *id);
        match oldest.and_then(|id| open.remove(&id)) {
            Some(conn) => {
                conn.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// A connection's entry, removed when its task ends.
struct ConnHandle {
    id: u64,
    conn: Arc<Conn>,
    conns: Arc<Conns>,
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        self.conns
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// Held from a request's arrival until its response body is dropped (fully written, or the
/// connection gone): the connection is busy meanwhile and the cap never closes it.
struct Busy(Arc<Conn>);

impl Busy {
    fn new(conn: &Arc<Conn>) -> Self {
        conn.busy.fetch_add(1, Ordering::SeqCst);
        conn.served.store(true, Ordering::SeqCst);
        Busy(conn.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts for the log, so that an attack is visible without a line per connection.
#[derive(Debug, Default)]
struct Cut {
    handshake_timeouts: AtomicU64,
    header_timeouts: AtomicU64,
    evicted: AtomicU64,
}

/// Serves `router` over TLS; each new connection uses the latest config of `configs` (a
/// client CA that rotates), and requests carry the verified [`PeerCertificates`] of their
/// connection. With `close_connections` (the apiserver before it knows the client CA) each
/// response says `Connection: close`, so that clients do not keep reusing a connection that
/// can never carry an identity.
///
/// Against hostile clients: the handshake and each request's headers must arrive within
/// their timeouts (hyper closes a connection whose headers are late, idle keep-alive ones
/// included); at most `max_connections` are open, the one idle the longest making room for
/// a new one; an accept error (out of file descriptors) backs off, up to a second.
///
/// When `shutdown` resolves, `readiness` turns to draining and requests are still served
/// for `shutdown_delay`, each response saying `Connection: close`; then no new connection is
/// taken, idle ones close, and the ones serving a request finish it (for up to
/// `drain_timeout`) before they close: kube-apiserver keeps reusing a connection to a pod
/// whose endpoint is already gone, and cutting it would fail an admission mid-flight.
pub async fn serve_with(
    listener: TcpListener,
    configs: tokio::sync::watch::Receiver<DynamicConfig>,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()>,
    limits: &ServeArgs,
    readiness: Readiness,
) {
    tokio::pin!(shutdown);
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let slots = Arc::new(tokio::sync::Semaphore::new(
        usize::try_from(limits.max_connections)
            .unwrap_or(usize::MAX)
            .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let conns = Arc::new(Conns::default());
    let cut = Arc::new(Cut::default());
    let mut tasks = tokio::task::JoinSet::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    // Set once `shutdown` resolved: serving goes on until then.
    let mut stop_at: Option<tokio::time::Instant> = None;
    let mut report = tokio::time::interval(Duration::from_secs(60));
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = (0, 0, 0);
    loop {
        while tasks.try_join_next().is_some() {}
        let until_stop = async {
            match stop_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown, if stop_at.is_none() => {
                readiness.start_draining();
                tracing::info!(delay = ?limits.shutdown_delay, "not ready any more; draining after the delay");
                stop_at = Some(tokio::time::Instant::now() + limits.shutdown_delay);
                continue;
            }
            () = until_stop => break,
            _ = report.tick() => {
                let now = (
                    cut.handshake_timeouts.load(Ordering::Relaxed),
                    cut.header_timeouts.load(Ordering::Relaxed),
                    cut.evicted.load(Ordering::Relaxed),
                );
                let (handshakes, headers, evicted) =
                    (now.0 - reported.0, now.1 - reported.1, now.2 - reported.2);
                let open = conns.open.lock().unwrap_or_else(|e| e.into_inner()).len();
                // Header timeouts alone are mostly clients' idle keep-alive connections
                // closed on schedule; late handshakes and evictions are not normal.
                if handshakes > 0 || evicted > 0 {
                    tracing::warn!(handshake_timeouts = handshakes, header_timeouts = headers,
                        evicted_at_cap = evicted, open, "connections cut in the last minute");
                } else if headers > 0 {
                    tracing::debug!(header_timeouts = headers, open,
                        "connections closed for late headers or idleness in the last minute");
                }
                reported = now;
                continue;
            }
        };
        let (tcp, peer) = match accepted {
            Ok(a) => {
                backoff = ACCEPT_BACKOFF_MIN;
                a
            }
            Err(e) => {
                // Out of file descriptors or the like: wait for some to be freed, longer
                // each time, instead of spinning on the error.
                tracing::warn!(retry_in = ?backoff, "accepting a connection failed: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if conns.evict_oldest_idle() {
                    cut.evicted.fetch_add(1, Ordering::Relaxed);
                }
                // The evicted connection gives its slot back as soon as it has closed; with
                // every connection busy, this waits for one to finish (and gives up on the
                // new one if none does in time, so that a shutdown is still seen).
                match tokio::time::timeout(
                    limits.header_read_timeout,
                    slots.clone().acquire_owned(),
                )
                .await
                {
                    Ok(Ok(slot)) => slot,
                    Ok(Err(_)) => break,
                    Err(_) => {
                        tracing::warn!(%peer, max = limits.max_connections,
                            "every connection is busy: closing a new one");
                        continue;
                    }
                }
            }
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
        let readiness = readiness.clone();
        let handle = conns.add();
        let cut = cut.clone();
        let handshake_timeout = limits.tls_handshake_timeout;
        let header_read_timeout = limits.header_read_timeout;
        tasks.spawn(async move {
            let _slot = slot;
            let conn = handle.conn.clone();
            let tls = tokio::select! {
                r = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)) => match r {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        cut.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "TLS handshake not done in {handshake_timeout:?}: closed");
                        return;
                    }
                },
                () = conn.evict.notified() => {
                    tracing::debug!(%peer, "closed while handshaking: the connection cap needs its place");
                    return;
                }
                _ = drain.wait_for(|d| *d) => return,
            };
            let router = match tls.get_ref().1.peer_certificates() {
                Some(chain) if !chain.is_empty() => {
                    let chain = PeerCertificates(Arc::new(
                        chain.iter().map(|c| c.clone().into_owned()).collect(),
                    ));
                    router.layer(axum::Extension(chain))
                }
                _ => router,
            };
            let tower = TowerToHyperService::new(router);
            let tracked = conn.clone();
            let stopping = readiness.clone();
            let service = hyper::service::service_fn(move |req| {
                let busy = Busy::new(&tracked);
                let call = hyper::service::Service::call(&tower, req);
                let stopping = stopping.clone();
                async move {
                    let mut resp = call.await?;
                    if stopping.draining() {
                        // Shutting down: the client opens its next connection elsewhere,
                        // instead of reusing this one just as the drain closes it.
                        resp.headers_mut().insert(
                            hyper::header::CONNECTION,
                            hyper::header::HeaderValue::from_static("close"),
                        );
                    }
                    Ok::<_, std::convert::Infallible>(resp.map(|body| {
                        // Busy until hyper drops the body: written, or the peer gone.
                        axum::body::Body::new(http_body_util::BodyExt::map_frame(
                            body,
                            move |frame| {
                                let _ = &busy;
                                frame
                            },
                        ))
                    }))
                }
            });
            let conn_fut = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(tls), service);
            tokio::pin!(conn_fut);
            tokio::select! {
                r = conn_fut.as_mut() => {
                    if let Err(e) = r {
                        if e.is_timeout() {
                            cut.header_timeouts.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::debug!(%peer, "connection ended: {e}");
                    }
                    return;
                }
                _ = drain.wait_for(|d| *d) => {}
                () = conn.evict.notified() => {
                    tracing::debug!(%peer, "idle connection closed: the connection cap needs its place");
                }
            }
            // Draining or evicted: an idle connection closes now, a busy one after its
            // response.
            conn_fut.as_mut().graceful_shutdown();
            let _ = conn_fut.await;
        });
    }
    drop(listener);
    let _ = drain_tx.send(true);
    let open = tasks.len();
    tracing::info!(open, timeout = ?limits.drain_timeout, "draining connections");
    let drained = tokio::time::timeout(limits.drain_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    match drained {
        Ok(()) => tracing::info!("every connection drained"),
        Err(_) => tracing::warn!(
            left = tasks.len(),
            "connections still open after the drain timeout are cut"
        ),
    }
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_and_without_units() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["", "s", "10h", "-1s", "ten"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_cap_evicts_a_connection_that_never_carried_a_request_first() {
        let conns = Arc::new(Conns::default());
        let pooled = conns.add();
        drop(Busy::new(&pooled.conn)); // served one request, idle since
        std::thread::sleep(Duration::from_millis(2));
        let silent = conns.add(); // newer, but never sent anything
        assert!(conns.evict_oldest_idle());
        let open = conns.open.lock().unwrap();
        assert!(open.contains_key(&pooled.id) && !open.contains_key(&silent.id));
        drop(open);
        // Only served connections left: the one idle the longest goes.
        assert!(conns.evict_oldest_idle());
        assert!(conns.open.lock().unwrap().is_empty());
        drop((pooled, silent));
    }

    #[test]
    fn the_cap_evicts_the_connection_idle_the_longest_never_a_busy_one() {
        let conns = Arc::new(Conns::default());
        let a = conns.add();
        std::thread::sleep(Duration::from_millis(2));
        let b = conns.add();
        let busy_a = Busy::new(&a.conn);
        // a is older but busy: b goes.
        assert!(conns.evict_oldest_idle());
        assert!(!conns.open.lock().unwrap().contains_key(&b.id));
        assert!(conns.open.lock().unwrap().contains_key(&a.id));
        // Every open connection busy: nothing to evict.
        assert!(!conns.evict_oldest_idle());
        drop(busy_a);
        assert!(conns.evict_oldest_idle());
        assert!(conns.open.lock().unwrap().is_empty());
        drop((a, b));
    }
}
