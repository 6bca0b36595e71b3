//! `vm-dhcp apiserver`: the aggregated API `dhcp.harvesterhci.io/v1alpha1` over HTTPS.
//!
//! The wiring around the `vm-dhcp-apiserver` crate: watches feed its engine (one consistent
//! snapshot of the IPPools and their IPPoolAddress objects, then a watch of each from that
//! revision; the agent pods), a prober tells the engine how far the IPPool watch has come
//! when an address change waits for it (see `vm_dhcp_apiserver::store`), a poller reads each
//! pool's active agent's lease view, TLS verifies the aggregator's client certificate
//! against the requestheader CA of `kube-system/extension-apiserver-authentication`
//! (reloaded when it rotates), and every request is authorized with a SubjectAccessReview.

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
use kube::api::{Api, ListParams, PostParams, VersionMatch, WatchEvent, WatchParams};
use kube::runtime::watcher;
use kube::runtime::{WatchStreamExt, watcher::Event};
use tokio::sync::mpsc;
use vm_dhcp_apiserver::auth::{
    AUTH_CONFIGMAP_NAME, AUTH_CONFIGMAP_NAMESPACE, Attributes, Authorizer, AuthzFuture,
    CachedAuthorizer, RequestHeaderConfig, UserInfo, VerifiedClientCert, common_name, decision_of,
    subject_access_review,
};
use vm_dhcp_apiserver::metrics::Metrics;
use vm_dhcp_apiserver::store::{Change, Engine, PoolIdentity, SourceKind, SourceObject};
use vm_dhcp_apiserver::views::{AGENT_LABEL, AGENT_LABEL_VALUE, AgentLeases, Key};
use vm_dhcp_apiserver::{ApiServer, router};
use vm_dhcp_core::crd::{IPPool, IPPoolAddress};

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
    /// Kubeconfig, one path or several separated by `:` (default: $KUBECONFIG,
    /// ~/.kube/config, then the in-cluster service account).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    #[command(flatten)]
    pub serve: crate::tls::ServeArgs,
    /// Port of the agents' HTTP server (GET /api/v1/leases).
    #[arg(long, env = "VM_DHCP_APISERVER_AGENT_PORT", default_value_t = 8080)]
    pub agent_port: u16,
    /// Bearer token presented to the agents (they accept a token whose user may get
    /// dhcpleases). Default: this pod's ServiceAccount token,
    /// /var/run/secrets/kubernetes.io/serviceaccount/token; re-read every round, as the
    /// kubelet rotates it.
    #[arg(long, env = "VM_DHCP_APISERVER_AGENT_TOKEN_FILE")]
    pub agent_token_file: Option<PathBuf>,
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
    let watch_end = server.clone();
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
    let (waiting_tx, waiting_rx) = tokio::sync::watch::channel(None);
    tokio::spawn(feed_engine(engine.clone(), rx, metrics, waiting_tx));
    tokio::spawn(watch_sources(client.clone(), tx.clone()));
    tokio::spawn(order_sources(client.clone(), waiting_rx, tx.clone()));
    tokio::spawn(watch_agents(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().labels(&format!("{AGENT_LABEL}={AGENT_LABEL_VALUE}")),
        tx.clone(),
    ));
    tokio::spawn(poll_leases(
        engine.clone(),
        tx,
        args.agent_port,
        args.agent_token_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(SERVICE_ACCOUNT_TOKEN)),
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
    // On SIGTERM the server stays ready-less but serving for the drain's delay (the
    // endpoint goes away meanwhile); then it stops accepting and its open watches end
    // cleanly, so their clients watch again elsewhere from their last version (a stream cut
    // at the drain timeout instead makes client-go list everything again).
    let delay = args.serve.shutdown_delay + Duration::from_millis(100);
    let shutdown = async move {
        crate::logging::shutdown_signal().await;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            tracing::info!("ending the open watches");
            watch_end.end_watches.send_replace(true);
        });
    };
    // /readyz fails from SIGTERM on, whatever the API's own readiness says, so that the
    // Pod leaves the Service's endpoints before the drain.
    let readiness = crate::tls::Readiness::default();
    let draining = readiness.clone();
    let app = app.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            use axum::response::IntoResponse;
            let draining = draining.draining() && req.uri().path() == "/readyz";
            async move {
                if draining {
                    (hyper::StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
                } else {
                    next.run(req).await
                }
            }
        },
    ));
    crate::tls::serve_with(listener, config_rx, app, shutdown, &args.serve, readiness).await;
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

/// The agent pods into the engine: a complete listing at start and after each watch restart,
/// then single changes (their order does not matter: they only say whom to ask for leases).
async fn watch_agents(api: Api<Pod>, config: watcher::Config, tx: mpsc::Sender<Change>) {
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut listing = Vec::new();
    while let Some(event) = stream.next().await {
        let change = match event {
            Ok(Event::Init) => {
                listing.clear();
                continue;
            }
            Ok(Event::InitApply(o)) => {
                listing.push(o);
                continue;
            }
            Ok(Event::InitDone) => Change::Agents(std::mem::take(&mut listing)),
            Ok(Event::Apply(o)) => Change::Apply(SourceObject::Agent(o)),
            Ok(Event::Delete(o)) => Change::Delete(SourceObject::Agent(o)),
            Err(e) => {
                tracing::warn!("agent pod watch failed, retrying: {e}");
                continue;
            }
        };
        if tx.send(change).await.is_err() {
            return;
        }
    }
}

/// Page size of the address objects' snapshot list.
const SNAPSHOT_PAGE: u32 = 5000;

/// The IPPools and their address objects as of one revision: the IPPools listed (a
/// consistent read), then the address objects at exactly that revision, page by page.
async fn snapshot(pools: &Api<IPPool>, addresses: &Api<IPPoolAddress>) -> Result<Change> {
    let listed = pools
        .list(&ListParams::default())
        .await
        .context("listing the IPPools")?;
    let revision = listed
        .metadata
        .resource_version
        .clone()
        .context("the IPPool list has no resourceVersion")?;
    let mut objects = Vec::new();
    let mut params = ListParams::default().limit(SNAPSHOT_PAGE);
    params.resource_version = Some(revision.clone());
    params.version_match = Some(VersionMatch::Exact);
    loop {
        let page = addresses
            .list(&params)
            .await
            .with_context(|| format!("listing the IPPoolAddress objects at revision {revision}"))?;
        objects.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params.continue_token = Some(token),
            None => break,
        }
    }
    Ok(Change::Snapshot {
        revision: revision.parse().with_context(|| {
            format!("the IPPool list's resourceVersion {revision:?} is not a number")
        })?,
        pools: listed.items,
        addresses: objects,
    })
}

/// The ordered sources (IPPools and IPPoolAddress objects): a snapshot, then a watch of each
/// from its revision; when either watch loses its place (410 Gone: kube-apiserver no longer
/// has the changes after our last version), both start over from a new snapshot.
async fn watch_sources(client: kube::Client, tx: mpsc::Sender<Change>) {
    let pools: Api<IPPool> = Api::all(client.clone());
    let addresses: Api<IPPoolAddress> = Api::all(client);
    let mut backoff = Duration::from_millis(500);
    loop {
        let snap = match snapshot(&pools, &addresses).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(
                    "{e:#}; retrying in {backoff:?} (does the server's identity have list on ippools and ippooladdresses?)"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        backoff = Duration::from_millis(500);
        let Change::Snapshot { revision, .. } = &snap else {
            continue;
        };
        let from = revision.to_string();
        tracing::info!(revision = %from, "IPPools and IPPoolAddress objects listed");
        if tx.send(snap).await.is_err() {
            return;
        }
        let mut on_pools = tokio::spawn(watch_from(
            pools.clone(),
            from.clone(),
            SourceKind::Pools,
            SourceObject::Pool,
            tx.clone(),
        ));
        let mut on_addresses = tokio::spawn(watch_from(
            addresses.clone(),
            from,
            SourceKind::Addresses,
            SourceObject::Address,
            tx.clone(),
        ));
        // The other one stops before the next snapshot is taken: nothing it received before
        // may reach the engine after that snapshot.
        tokio::select! {
            _ = &mut on_pools => {
                on_addresses.abort();
                let _ = on_addresses.await;
            }
            _ = &mut on_addresses => {
                on_pools.abort();
                let _ = on_pools.await;
            }
        }
        if tx.is_closed() {
            return;
        }
        tracing::info!("a source watch lost its place (410): listing again");
    }
}

/// Watches one ordered kind from `version` until it lost its place (410), resuming from the
/// last version seen (event or bookmark) when the connection ends.
async fn watch_from<K>(
    api: Api<K>,
    mut version: String,
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
    let params = WatchParams::default().timeout(290);
    loop {
        let stream = match api.watch(&params, &version).await {
            Ok(s) => s,
            Err(kube::Error::Api(status)) if status.code == 410 => return,
            Err(e) => {
                tracing::warn!(?kind, "watch failed, retrying from {version}: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let change = match event {
                Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => {
                    version = o.meta().resource_version.clone().unwrap_or(version);
                    Change::Apply(wrap(o))
                }
                Ok(WatchEvent::Deleted(o)) => {
                    version = o.meta().resource_version.clone().unwrap_or(version);
                    Change::Delete(wrap(o))
                }
                Ok(WatchEvent::Bookmark(b)) => {
                    version = b.metadata.resource_version;
                    match version.parse() {
                        Ok(rev) => Change::Progress(kind, rev),
                        Err(_) => continue,
                    }
                }
                Ok(WatchEvent::Error(status)) if status.code == 410 => return,
                Ok(WatchEvent::Error(status)) => {
                    tracing::warn!(
                        ?kind,
                        "watch error, resuming from {version}: {}",
                        status.message
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
                Err(e) => {
                    tracing::warn!(?kind, "watch broke, resuming from {version}: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            };
            if tx.send(change).await.is_err() {
                return;
            }
        }
    }
}

/// Lists the IPPools' identities at the latest revision: when they match what the IPPool
/// watch delivered, the engine knows that watch has nothing earlier left that could change a
/// view (see `vm_dhcp_apiserver::store`).
async fn probe_pools(pools: &Api<IPPool>) -> Result<Change> {
    let listed = pools
        .list_metadata(&ListParams::default())
        .await
        .context("listing the IPPools' metadata")?;
    let revision = listed
        .metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .context("the IPPool list has no numeric resourceVersion")?;
    Ok(Change::PoolProbe {
        revision,
        pools: listed
            .items
            .iter()
            .map(|p| {
                (
                    (
                        p.metadata.namespace.clone().unwrap_or_default(),
                        p.metadata.name.clone().unwrap_or_default(),
                    ),
                    PoolIdentity::of(&p.metadata),
                )
            })
            .collect(),
    })
}

/// An address change waits at most this long for the IPPool watch (probes answer in
/// milliseconds; this only bounds a failing probe).
const POOLS_WAIT: Duration = Duration::from_secs(2);
/// A pool spec change waits at most this long for the address watch to show it has
/// nothing earlier (there is no cheap list that proves it; a quiet watch says nothing).
const ADDRESSES_WAIT: Duration = Duration::from_secs(1);
/// At most one IPPool identity list per this interval.
const PROBE_INTERVAL: Duration = Duration::from_millis(20);

/// Keeps the engine's two ordered streams moving: when a change waits for the IPPool watch,
/// lists the IPPools' identities; when a wait lasts too long, tells the engine to stop
/// waiting (a change that then arrives out of order restarts the watches of this replica).
async fn order_sources(
    client: kube::Client,
    mut waiting: tokio::sync::watch::Receiver<Option<(SourceKind, u64)>>,
    tx: mpsc::Sender<Change>,
) {
    let pools: Api<IPPool> = Api::all(client);
    let mut since: Option<((SourceKind, u64), tokio::time::Instant)> = None;
    let mut last_probe: Option<tokio::time::Instant> = None;
    loop {
        let Some(wait) = *waiting.borrow_and_update() else {
            since = None;
            if waiting.changed().await.is_err() {
                return;
            }
            continue;
        };
        let now = tokio::time::Instant::now();
        let started = match since {
            // The same change still waits (a later one waiting means the last wait ended).
            Some((w, at)) if w == wait => at,
            _ => now,
        };
        since = Some((wait, started));
        let (kind, revision) = wait;
        let limit = match kind {
            SourceKind::Pools => POOLS_WAIT,
            _ => ADDRESSES_WAIT,
        };
        if now - started >= limit {
            if kind == SourceKind::Pools {
                tracing::warn!(
                    revision,
                    "the IPPools' identities could not be listed in time: stopped waiting for their watch to pass a waiting address change"
                );
            } else {
                // Normal in a quiet cluster: nothing proves the address watch is past a pool
                // spec change but time.
                tracing::debug!(revision, "stopped waiting for the address watch");
            }
            since = None;
            if tx.send(Change::Progress(kind, revision)).await.is_err() {
                return;
            }
        } else if kind == SourceKind::Pools {
            if let Some(at) = last_probe {
                tokio::time::sleep_until(at + PROBE_INTERVAL).await;
            }
            last_probe = Some(tokio::time::Instant::now());
            match probe_pools(&pools).await {
                Ok(change) => {
                    if tx.send(change).await.is_err() {
                        return;
                    }
                }
                Err(e) => tracing::debug!("{e:#}"),
            }
        }
        // Wait for the engine to say what it waits for after this, or for the next step.
        let next = if kind == SourceKind::Pools {
            PROBE_INTERVAL
        } else {
            limit.saturating_sub(now - started).max(PROBE_INTERVAL)
        };
        let _ = tokio::time::timeout(next, waiting.changed()).await;
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

/// Applies changes in batches: whatever arrived while the previous batch was computed; then
/// says what the engine waits for.
async fn feed_engine(
    engine: Arc<Engine>,
    mut rx: mpsc::Receiver<Change>,
    metrics: Metrics,
    waiting: tokio::sync::watch::Sender<Option<(SourceKind, u64)>>,
) {
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
        // A snapshot of 60,000 address objects takes milliseconds: off the async workers.
        let now_waiting = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            engine.apply(batch);
            metrics.applied(started.elapsed());
            for (resource, count) in engine.object_counts() {
                metrics.objects(resource.def().plural, count);
            }
            engine.waiting()
        })
        .await
        .unwrap_or(None);
        waiting.send_if_modified(|w| {
            let changed = *w != now_waiting;
            *w = now_waiting;
            changed
        });
    }
}

/// Reads each pool's active agent's `/api/v1/leases`: the candidates are asked in order and
/// the first that says it is active wins (else the first that answers).
async fn poll_leases(
    engine: Arc<Engine>,
    tx: mpsc::Sender<Change>,
    port: u16,
    token_file: PathBuf,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        tick.tick().await;
        if !engine.is_ready() {
            continue;
        }
        let token: Option<Arc<str>> = match std::fs::read_to_string(&token_file) {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().into()),
            Ok(_) | Err(_) => {
                if !warned {
                    tracing::warn!(
                        "no token in {} (--agent-token-file): the agents will refuse to show their leases",
                        token_file.display()
                    );
                    warned = true;
                }
                None
            }
        };
        let mut tasks = tokio::task::JoinSet::new();
        for (pool, candidates) in engine.lease_targets() {
            let token = token.clone();
            tasks.spawn(async move {
                let doc = leases_of(&pool, &candidates, port, token.as_deref()).await;
                (pool.clone(), doc)
            });
        }
        while let Some(done) = tasks.join_next().await {
            let Ok((pool, doc)) = done else { continue };
            if tx.send(Change::Leases(pool, doc)).await.is_err() {
                return;
            }
        }
    }
}

async fn leases_of(
    pool: &Key,
    candidates: &[(Key, String)],
    port: u16,
    token: Option<&str>,
) -> Option<AgentLeases> {
    let mut fallback = None;
    for ((_, pod), ip) in candidates {
        match fetch_leases(ip, port, token).await {
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

/// Where a pod finds its ServiceAccount token.
const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

async fn fetch_leases(ip: &str, port: u16, token: Option<&str>) -> Result<AgentLeases> {
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
        let mut req = hyper::Request::get("/api/v1/leases").header(hyper::header::HOST, &host);
        if let Some(token) = token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req.body(http_body_util::Empty::<bytes_alias::Bytes>::new())?;
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
