//! `vm-dhcp agent`: the DHCPv4 server of one pool.
//!
//! Pieces, each a task on one current-thread runtime:
//! - a pool source sends whole snapshots into a channel: offline, the IPPool manifest of a
//!   watched file (its status lists the leases); in the cluster, the IPPool's spec and its
//!   `IPPoolAddress` objects, both watched, plus a periodic re-read of the IPPool;
//! - the table task turns each snapshot into a [`LeaseTable`] (resolving NTP host names) and
//!   publishes it; a periodic resync rebuilds it and re-resolves names;
//! - the DHCP task owns the socket: receive → decide (pure, in core) → send;
//! - the HTTP task serves health, readiness, leases and metrics.
//!
//! `active` says whether this agent answers: with `--lease-lock` only the Lease holder does
//! (see [`lock`]); a standby keeps its table warm and answers nothing. Without a lock the
//! agent is always active.

mod auth;
mod bind;
mod cluster;
mod http;
mod lock;
mod metrics;
mod netif;
mod packet;
mod socket;
mod source;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, bail};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use vm_dhcp_core::dhcp::{LeaseBook, LeaseTable};

use crate::cli::AgentArgs;

pub use metrics::Metrics;

/// What the tasks share.
pub struct AgentState {
    pub name: String,
    pub dry_run: bool,
    /// The table in force; `None` until the first pool snapshot is loaded.
    pub table: watch::Sender<Option<Arc<LeaseTable>>>,
    pub book: Mutex<LeaseBook>,
    pub metrics: Metrics,
    pub registry: Registry,
    pub socket_bound: AtomicBool,
    /// Only an active agent answers (see the module docs).
    pub active: AtomicBool,
    /// When the agent started (the first table's log says how long it took).
    pub started: std::time::Instant,
}

impl AgentState {
    pub fn new(name: String, dry_run: bool) -> Self {
        let mut registry = Registry::with_prefix("vmdhcp_agent");
        let metrics = Metrics::register(&mut registry);
        metrics.active.set(1);
        AgentState {
            name,
            dry_run,
            table: watch::Sender::new(None),
            book: Mutex::new(LeaseBook::new()),
            metrics,
            registry,
            socket_bound: AtomicBool::new(false),
            active: AtomicBool::new(true),
            started: std::time::Instant::now(),
        }
    }

    pub fn current_table(&self) -> Option<Arc<LeaseTable>> {
        self.table.borrow().clone()
    }

    /// The lease book; a panic elsewhere while holding it cannot leave it half-written in a
    /// way that matters (it is activity, rebuilt by traffic), so poisoning is ignored.
    pub fn book(&self) -> MutexGuard<'_, LeaseBook> {
        self.book
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Ready means: the socket is bound and a lease table is loaded (in the cluster, the
    /// first table waits for both watches, the IPPool and its address objects, to sync).
    pub fn is_ready(&self) -> bool {
        self.socket_bound.load(Ordering::Relaxed) && self.table.borrow().is_some()
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM ({e}); only SIGINT stops the agent");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => tracing::info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
    }
}

/// Waits until the shutdown flag flips (or its sender is gone).
pub async fn stopped(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn init_logging(args: &AgentArgs) {
    let level = if args.trace {
        "trace"
    } else if args.debug {
        "debug"
    } else {
        "info"
    };
    crate::logging::init_filter(level);
}

/// Where the pool comes from.
enum Mode {
    File(std::path::PathBuf),
    Cluster {
        pool: cluster::ObjectRef,
        lock: Option<lock::LockConfig>,
    },
}

fn mode(args: &AgentArgs, name: &str) -> anyhow::Result<Mode> {
    let lock = match &args.lease_lock {
        Some(lease) => Some(lock::config(
            lease,
            name,
            args.lease_duration_seconds,
            args.manage_server_ip.then(|| args.nic.clone()),
        )?),
        None if args.manage_server_ip => bail!(
            "--manage-server-ip needs --lease-lock: without a Lease two agents could hold the server IP at once"
        ),
        None => None,
    };
    match (&args.ippool_file, &args.ippool_ref) {
        (Some(_), Some(_)) => bail!(
            "--ippool-file and --ippool-ref (IPPOOL_REF) both given: pass one (the file is the offline mode)"
        ),
        (Some(file), None) => {
            if lock.is_some() {
                bail!("--lease-lock needs cluster mode (--ippool-ref), not --ippool-file");
            }
            Ok(Mode::File(file.clone()))
        }
        (None, Some(pool)) => Ok(Mode::Cluster {
            pool: cluster::parse_ref("--ippool-ref", pool)?,
            lock,
        }),
        (None, None) => bail!(
            "nothing to serve: pass --ippool-file <pool.yaml> (offline) or --ippool-ref <namespace>/<name> (cluster)"
        ),
    }
}

pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    init_logging(&args);
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("vm-dhcp-agent-{}", args.nic));
    let mode = mode(&args, &name)?;
    if args.resync_seconds == 0 {
        bail!("--resync-seconds must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args, name, mode))
}

async fn serve(args: AgentArgs, name: String, mode: Mode) -> anyhow::Result<()> {
    let state = Arc::new(AgentState::new(name.clone(), args.dry_run));
    let (stop_tx, stop_rx) = watch::channel(false);
    // A client first: a bad kubeconfig is reported before any socket is opened.
    let client = match &mode {
        Mode::File(_) => None,
        Mode::Cluster { .. } => Some(
            crate::kube_client::client(args.kubeconfig.as_deref())
                .await
                .context("cluster mode needs the API; or run offline with --ippool-file")?,
        ),
    };

    let socket = socket::open(&args.nic).with_context(|| {
        format!(
            "opening the DHCP socket (UDP 0.0.0.0:67 on {nic}); the agent needs root or CAP_NET_BIND_SERVICE + CAP_NET_RAW, and the interface must exist in this network namespace (--nic)",
            nic = args.nic
        )
    })?;
    state.socket_bound.store(true, Ordering::Relaxed);

    let listen = bind::listen_addrs(args.http_addr, args.pod_ip, &args.nic)?;
    let listeners = listen
        .iter()
        .map(bind::bind)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let http = listen
        .iter()
        .map(|l| l.addr.to_string())
        .collect::<Vec<_>>()
        .join(",");

    let resync = Duration::from_secs(args.resync_seconds);
    let (pool_tx, pool_rx) = watch::channel(None);
    let mut background = Vec::new();
    let mut lock_task = None;
    let mut auth = None;
    match (mode, client) {
        (Mode::File(file), _) => {
            tracing::info!(
                agent = %name, nic = %args.nic, pool_file = %file.display(),
                %http, dry_run = args.dry_run, "agent starting (offline)"
            );
            background.push(tokio::spawn(source::watch_file(
                file,
                pool_tx,
                state.clone(),
                stop_rx.clone(),
            )));
        }
        (Mode::Cluster { pool, lock }, Some(client)) => {
            tracing::info!(
                agent = %name, nic = %args.nic, ippool = %pool, %http,
                lease_lock = lock.as_ref().map(|l| l.lease.to_string()).unwrap_or_default(),
                manage_server_ip = args.manage_server_ip, dry_run = args.dry_run,
                "agent starting (cluster)"
            );
            auth = Some(Arc::new(auth::Auth::new(
                client.clone(),
                pool.namespace.clone(),
            )));
            let pools: kube::Api<vm_dhcp_core::crd::IPPool> =
                kube::Api::namespaced(client.clone(), &pool.namespace);
            let addresses: kube::Api<cluster::AddressRecord> =
                kube::Api::namespaced(client.clone(), &pool.namespace);
            background.push(tokio::spawn(cluster::watch_cluster(
                pools,
                addresses,
                pool,
                pool_tx,
                state.clone(),
                resync,
                stop_rx.clone(),
            )));
            if let Some(lock) = lock {
                // Standby until the Lease says otherwise.
                state.active.store(false, Ordering::Relaxed);
                state.metrics.active.set(0);
                let leases = kube::Api::namespaced(client, &lock.lease.namespace);
                lock_task = Some(tokio::spawn(lock::run(
                    leases,
                    lock,
                    state.clone(),
                    stop_rx.clone(),
                )));
            }
        }
        (Mode::Cluster { .. }, None) => bail!("cluster mode without a client"),
    }
    background.push(tokio::spawn(source::build_tables(
        pool_rx,
        state.clone(),
        resync,
        stop_rx.clone(),
    )));
    let dhcp_task = tokio::spawn(socket::serve(socket, state.clone(), stop_rx.clone()));
    let http_tasks: Vec<_> = listeners
        .into_iter()
        .map(|l| tokio::spawn(http::serve(l, state.clone(), auth.clone(), stop_rx.clone())))
        .collect();

    let mut dhcp_task = dhcp_task;
    let result = tokio::select! {
        _ = shutdown_signal() => Ok(()),
        r = &mut dhcp_task => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.context("the DHCP server stopped")),
            Err(e) => Err(anyhow::anyhow!("the DHCP task failed: {e}")),
        },
    };
    let _ = stop_tx.send(true);
    // The lock first: it drops the server IP and releases the Lease so a standby takes
    // over at once.
    if let Some(task) = lock_task {
        let _ = task.await;
    }
    for task in background {
        let _ = task.await;
    }
    for http_task in http_tasks {
        match http_task.await {
            Ok(Err(e)) => tracing::warn!("HTTP server: {e:#}"),
            Err(e) => tracing::warn!("HTTP task: {e}"),
            Ok(Ok(())) => {}
        }
    }
    if !dhcp_task.is_finished() {
        let _ = dhcp_task.await;
    }
    tracing::info!("agent stopped");
    result
}
