//! `vm-dhcp apiserver`: the aggregated API `dhcp.harvesterhci.io/v1alpha1` over HTTPS.
//!
//! The wiring around the `vm-dhcp-apiserver` crate: kube-rs watchers feed its engine
//! (IPPools and agent pods), a poller reads each pool's active agent's lease view, TLS
//! verifies the aggregator's client certificate against the requestheader CA of
//! `kube-system/extension-apiserver-authentication` (reloaded when it rotates), and every
//! request is authorized with a SubjectAccessReview.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use kube::runtime::{WatchStreamExt, watcher::Event};
use tokio::sync::mpsc;
use vm_dhcp_apiserver::auth::{
    AUTH_CONFIGMAP_NAME, AUTH_CONFIGMAP_NAMESPACE, Attributes, Authorizer, AuthzFuture,
    CachedAuthorizer, RequestHeaderConfig, UserInfo, VerifiedClientCert, common_name, decision_of,
    subject_access_review,
};
use vm_dhcp_apiserver::metrics::Metrics;
use vm_dhcp_apiserver::store::{Change, Engine, SourceKind, SourceObject};
use vm_dhcp_apiserver::views::{AGENT_LABEL, AGENT_LABEL_VALUE, AgentLeases, Key};
use vm_dhcp_apiserver::{ApiServer, router};
use vm_dhcp_core::crd::IPPool;

use crate::tls::{DynamicConfig, PeerCertificates, ReloadingCert, certified_key};

#[derive(Args, Debug, Clone)]
pub struct ApiserverArgs {
    /// HTTPS port (the APIService's Service points here).
    #[arg(long, env = "VM_DHCP_APISERVER_SECURE_PORT", default_value_t = 8443)]
    pub secure_port: u16,
    #[arg(
        long,
        env = "VM_DHCP_APISERVER_BIND_ADDRESS",
        default_value = "0.0.0.0"
    )]
    pub bind_address: IpAddr,
    /// Serving certificate (PEM), with --tls-private-key-file; reloaded when it changes.
    /// Without both, a self-signed certificate (then the APIService needs
    /// insecureSkipTLSVerify).
    #[arg(
        long,
        env = "VM_DHCP_APISERVER_TLS_CERT_FILE",
        requires = "tls_private_key_file"
    )]
    pub tls_cert_file: Option<PathBuf>,
    #[arg(
        long,
        env = "VM_DHCP_APISERVER_TLS_KEY_FILE",
        requires = "tls_cert_file"
    )]
    pub tls_private_key_file: Option<PathBuf>,
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Port of the agents' HTTP server (GET /api/v1/leases).
    #[arg(long, env = "VM_DHCP_APISERVER_AGENT_PORT", default_value_t = 8080)]
    pub agent_port: u16,
    /// How often the active agents' lease views are read (milliseconds).
    #[arg(long, env = "VM_DHCP_APISERVER_LEASE_POLL_MS", default_value_t = 1000)]
    pub lease_poll_ms: u64,
    /// How long authorization decisions (SubjectAccessReviews) are cached (seconds).
    #[arg(
        long,
        env = "VM_DHCP_APISERVER_AUTHZ_CACHE_SECONDS",
        default_value_t = 10
    )]
    pub authorization_cache_seconds: u64,
    /// Plain-HTTP port for /metrics (Prometheus cannot present the aggregator's client
    /// certificate that the secure port requires); 0 turns it off.
    #[arg(long, env = "VM_DHCP_APISERVER_METRICS_PORT", default_value_t = 8081)]
    pub metrics_port: u16,
    #[arg(long, env = "VM_DHCP_APISERVER_DEBUG")]
    pub debug: bool,
}

pub fn run(args: ApiserverArgs) -> Result<()> {
    crate::logging::init(args.debug);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(args))
}

/// Delegated authorization: one SubjectAccessReview per (user, attributes), cached above.
struct SarAuthorizer {
    client: kube::Client,
}

impl Authorizer for SarAuthorizer {
    fn authorize<'a>(&'a self, user: &'a UserInfo, attrs: &'a Attributes) -> AuthzFuture<'a> {
        Box::pin(async move {
            let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
            let review = api
                .create(&PostParams::default(), &subject_access_review(user, attrs))
                .await
                .map_err(|e| {
                    format!("{e} (does the server's identity have the system:auth-delegator ClusterRole?)")
                })?;
            Ok(decision_of(&review))
        })
    }
}

fn self_signed() -> Result<Arc<ReloadingCert>> {
    let key = rcgen::KeyPair::generate()?;
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
    let cert = params.self_signed(&key)?;
    Ok(ReloadingCert::new(certified_key(
        cert.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
    )?))
}

async fn serve(args: ApiserverArgs) -> Result<()> {
    let client = crate::kube_client::client(args.kubeconfig.as_deref()).await?;
    let cert = match (&args.tls_cert_file, &args.tls_private_key_file) {
        (Some(c), Some(k)) => ReloadingCert::watch_files(c.clone(), k.clone())?,
        (None, None) => {
            tracing::warn!(
                "no --tls-cert-file: serving a self-signed certificate (the APIService needs insecureSkipTLSVerify)"
            );
            self_signed()?
        }
        _ => bail!("--tls-cert-file and --tls-private-key-file go together"),
    };

    let engine = Arc::new(Engine::default());
    let authorizer = CachedAuthorizer::new(
        Arc::new(SarAuthorizer {
            client: client.clone(),
        }),
        Duration::from_secs(args.authorization_cache_seconds),
    );
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let mut server = ApiServer::new(engine.clone(), Arc::new(authorizer));
    server.metrics = metrics.clone();
    server.authn_ready.store(false, Ordering::Relaxed);
    let server = Arc::new(server);
    if args.metrics_port != 0 {
        serve_metrics(
            SocketAddr::new(args.bind_address, args.metrics_port),
            Arc::new(registry),
        )
        .await?;
    }

    // Until the requestheader CA is known, no certificate is asked for: every request but
    // the probes gets 401 (fail closed).
    let (config_tx, mut config_rx) = tokio::sync::watch::channel(DynamicConfig {
        config: Arc::new(crate::tls::server_config(cert.clone())?),
        close_connections: true,
    });
    tokio::spawn(watch_authentication_config(
        client.clone(),
        server.clone(),
        cert.clone(),
        config_tx,
    ));

    let (tx, rx) = mpsc::channel::<Change>(1024);
    tokio::spawn(feed_engine(engine.clone(), rx, metrics));
    tokio::spawn(watch_kind(
        Api::<IPPool>::all(client.clone()),
        watcher::Config::default(),
        SourceKind::Pools,
        SourceObject::Pool,
        tx.clone(),
    ));
    tokio::spawn(watch_kind(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().labels(&format!("{AGENT_LABEL}={AGENT_LABEL_VALUE}")),
        SourceKind::Agents,
        SourceObject::Agent,
        tx.clone(),
    ));
    tokio::spawn(poll_leases(
        engine.clone(),
        tx,
        args.agent_port,
        Duration::from_millis(args.lease_poll_ms.max(100)),
    ));

    // The TLS layer hands over the verified chain; the crate wants the identity.
    let app = router(server).layer(axum::middleware::map_request(
        |mut req: axum::extract::Request| async move {
            let cn = req
                .extensions()
                .get::<PeerCertificates>()
                .and_then(|p| p.0.first().and_then(|c| common_name(c)));
            if let Some(common_name) = cn {
                req.extensions_mut()
                    .insert(VerifiedClientCert { common_name });
            }
            req
        },
    ));
    // Normally the CA arrives within milliseconds: wait for it before accepting, so that the
    // aggregator's first connections already present their certificate. If it does not come
    // (RBAC missing), serve anyway: probes answer, and /readyz says why it is not ready.
    if tokio::time::timeout(Duration::from_secs(10), config_rx.changed())
        .await
        .is_err()
    {
        tracing::warn!(
            "no requestheader CA after 10 s: serving without client certificates for now (every request but the probes gets 401)"
        );
    }
    let addr = SocketAddr::new(args.bind_address, args.secure_port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, "aggregated API serving dhcp.harvesterhci.io/v1alpha1");
    crate::tls::serve_dynamic(listener, config_rx, app, crate::logging::shutdown_signal()).await;
    Ok(())
}

/// Watches `kube-system/extension-apiserver-authentication`: the requestheader settings go to
/// the router, the CA into the TLS client verifier.
async fn watch_authentication_config(
    client: kube::Client,
    server: Arc<ApiServer>,
    cert: Arc<ReloadingCert>,
    configs: tokio::sync::watch::Sender<DynamicConfig>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, AUTH_CONFIGMAP_NAMESPACE);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={AUTH_CONFIGMAP_NAME}"));
    let mut stream = watcher(api, cfg)
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut last: Option<BTreeMap<String, String>> = None;
    while let Some(item) = stream.next().await {
        let cm = match item {
            Ok(cm) => cm,
            Err(e) => {
                tracing::warn!(
                    "cannot read {AUTH_CONFIGMAP_NAMESPACE}/{AUTH_CONFIGMAP_NAME} (is the extension-apiserver-authentication-reader RoleBinding in place?): {e}"
                );
                continue;
            }
        };
        let data = cm.data.unwrap_or_default();
        if last.as_ref() == Some(&data) {
            continue;
        }
        match RequestHeaderConfig::from_configmap(&data).and_then(|(rh, ca)| {
            crate::tls::server_config_with_client_ca(cert.clone(), ca.as_bytes())
                .map(|c| (rh, c))
                .map_err(|e| format!("{e:#}"))
        }) {
            Ok((rh, tls)) => {
                *server
                    .request_header
                    .write()
                    .unwrap_or_else(|e| e.into_inner()) = rh;
                let _ = configs.send(DynamicConfig {
                    config: Arc::new(tls),
                    close_connections: false,
                });
                server.authn_ready.store(true, Ordering::Relaxed);
                tracing::info!("requestheader client CA and settings loaded");
            }
            Err(e) => tracing::error!("keeping the previous authentication settings: {e}"),
        }
        last = Some(data);
    }
}

/// One kind of source object into the engine: a complete listing at start and after each
/// watch restart (`Replace`), then single changes.
async fn watch_kind<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: SourceKind,
    wrap: fn(K) -> SourceObject,
    tx: mpsc::Sender<Change>,
) where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + k8s_openapi::serde::de::DeserializeOwned
        + Send
        + 'static,
{
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut listing = Vec::new();
    while let Some(event) = stream.next().await {
        let change = match event {
            Ok(Event::Init) => {
                listing.clear();
                continue;
            }
            Ok(Event::InitApply(o)) => {
                listing.push(wrap(o));
                continue;
            }
            Ok(Event::InitDone) => Change::Replace(kind, std::mem::take(&mut listing)),
            Ok(Event::Apply(o)) => Change::Apply(wrap(o)),
            Ok(Event::Delete(o)) => Change::Delete(wrap(o)),
            Err(e) => {
                tracing::warn!(?kind, "watch failed, retrying: {e}");
                continue;
            }
        };
        if tx.send(change).await.is_err() {
            return;
        }
    }
}

/// /metrics on its own plain-HTTP listener.
async fn serve_metrics(
    addr: SocketAddr,
    registry: Arc<prometheus_client::registry::Registry>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("binding the metrics port {addr} (--metrics-port; 0 turns it off)")
    })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move { crate::metrics_http::response(crate::metrics_http::encode(&registry)) }
        }),
    );
    tracing::info!(%addr, "metrics serving");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(crate::logging::shutdown_signal())
            .await
        {
            tracing::error!("metrics server stopped: {e}");
        }
    });
    Ok(())
}

/// Applies changes in batches: whatever arrived while the previous batch was computed.
async fn feed_engine(engine: Arc<Engine>, mut rx: mpsc::Receiver<Change>, metrics: Metrics) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let engine = engine.clone();
        let metrics = metrics.clone();
        // Computing a 16,000-address pool takes milliseconds: off the async workers.
        let _ = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            engine.apply(batch);
            metrics.applied(started.elapsed());
            for (resource, count) in engine.object_counts() {
                metrics.objects(resource.def().plural, count);
            }
        })
        .await;
    }
}

/// Reads each pool's active agent's `/api/v1/leases`: the candidates are asked in order and
/// the first that says it is active wins (else the first that answers).
async fn poll_leases(engine: Arc<Engine>, tx: mpsc::Sender<Change>, port: u16, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !engine.is_ready() {
            continue;
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (pool, candidates) in engine.lease_targets() {
            tasks.spawn(async move { (pool.clone(), leases_of(&pool, &candidates, port).await) });
        }
        while let Some(done) = tasks.join_next().await {
            let Ok((pool, doc)) = done else { continue };
            if tx.send(Change::Leases(pool, doc)).await.is_err() {
                return;
            }
        }
    }
}

async fn leases_of(pool: &Key, candidates: &[(Key, String)], port: u16) -> Option<AgentLeases> {
    let mut fallback = None;
    for ((_, pod), ip) in candidates {
        match fetch_leases(ip, port).await {
            Ok(mut doc) => {
                if doc.agent.is_none() {
                    doc.agent = Some(pod.clone());
                }
                if doc.active {
                    return Some(doc);
                }
                fallback.get_or_insert(doc);
            }
            Err(e) => {
                tracing::debug!(pool = %format!("{}/{}", pool.0, pool.1), %pod, "agent lease view: {e:#}")
            }
        }
    }
    fallback
}

async fn fetch_leases(ip: &str, port: u16) -> Result<AgentLeases> {
    let host = if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    };
    let fetch = async {
        let tcp = tokio::net::TcpStream::connect(&host).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get("/api/v1/leases")
            .header(hyper::header::HOST, &host)
            .body(http_body_util::Empty::<bytes_alias::Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!(
                "GET http://{host}/api/v1/leases: {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        serde_json::from_slice::<AgentLeases>(&body)
            .with_context(|| format!("GET http://{host}/api/v1/leases: not the lease view"))
    };
    tokio::time::timeout(Duration::from_secs(2), fetch)
        .await
        .with_context(|| format!("GET http://{host}/api/v1/leases: no answer within 2 s"))?
}

/// hyper's body bytes type, without a direct dependency on `bytes`.
mod bytes_alias {
    pub use axum::body::Bytes;
}
