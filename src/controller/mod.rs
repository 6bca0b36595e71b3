//! `vm-dhcp controller`: keeps the world in order and holds no state of its own (the truth
//! is the allocation store's objects). Every replica watches the cluster into caches and
//! serves metrics and readiness from them; only the leader (a coordination.k8s.io Lease) writes:
//! - IPPools: finalizer, NAD labels, marks and counts, conditions, agent pods;
//! - VMs → vmnetcfgs (created, updated and deleted by us, never by the garbage collector);
//! - releases: the only component that gives addresses back, when a VM, NIC or vmnetcfg
//!   entry is really gone, and after a grace period for allocations nobody owns (leaks).
//!
//! Decisions are the pure functions of `vm_dhcp_core::controller::plan`: this module feeds
//! them what the caches hold and hands the writes they plan to `writer`, which applies them
//! only while this replica leads.

mod http;
mod pool;
mod workload;
mod writer;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use vm_dhcp_core::admission::network_key;
use vm_dhcp_core::controller::owners::{Kind, OwnerIndex, Source};
use vm_dhcp_core::controller::plan::{Plan, Settings, Write};
use vm_dhcp_core::controller::{self as decide, OrphanClock};
use vm_dhcp_core::crd::{IPPool, IPPoolAddress, IPPoolMACClaim, VirtualMachineNetworkConfig};
use vm_dhcp_core::kubevirt::{NetworkAttachmentDefinition, VirtualMachine};
use writer::Applied;

#[derive(Args, Debug, Clone)]
pub struct ControllerArgs {
    /// Name of this controller (logs, Events' reporting controller).
    #[arg(
        long,
        env = "VM_DHCP_CONTROLLER_NAME",
        default_value = "vm-dhcp-controller"
    )]
    pub name: String,
    /// Namespace of the agent pods and of their Leases.
    #[arg(long, env = "AGENT_NAMESPACE", default_value = "harvester-system")]
    pub namespace: String,
    /// Agent image `repo[:tag]` (no tag means `latest`, as upstream parses it).
    #[arg(
        long,
        env = "AGENT_IMAGE",
        default_value = "rancher/harvester-vm-dhcp:latest"
    )]
    pub image: String,
    /// Service account of the agent pods.
    #[arg(
        long,
        env = "AGENT_SERVICE_ACCOUNT_NAME",
        default_value = "vm-dhcp-agent"
    )]
    pub service_account_name: String,
    /// Run without leader election (only one replica may run then).
    #[arg(long)]
    pub no_leader_election: bool,
    /// Never create, watch or delete agent pods.
    #[arg(long)]
    pub no_agent: bool,
    /// Start the agents with --dry-run: they decide but send nothing.
    #[arg(long)]
    pub no_dhcp: bool,
    /// Serve /ipams/<network> and /caches/<network> (debugging views of the pools).
    #[arg(long)]
    pub enable_cache_dump_api: bool,
    /// Agent pods per pool, on distinct eligible nodes (fewer when fewer nodes qualify).
    #[arg(long, env = "VM_DHCP_AGENTS_PER_POOL", default_value_t = 2)]
    pub agents_per_pool: usize,
    /// Also place agents on Harvester witness nodes (they often lack the VM networks'
    /// uplinks: harvester#6419).
    #[arg(long, env = "VM_DHCP_AGENTS_ON_WITNESS_NODES")]
    pub agents_on_witness_nodes: bool,
    /// Seconds a pod may sit on an unreachable node before it is force-deleted and replaced.
    #[arg(long, env = "VM_DHCP_LOST_NODE_GRACE_SECONDS", default_value_t = 30)]
    pub lost_node_grace_seconds: u64,
    /// Seconds an allocation may have no owner (no vmnetcfg entry or VM NIC with its MAC on
    /// its network) before it is released as a leak.
    #[arg(long, env = "VM_DHCP_LEAK_GRACE_SECONDS", default_value_t = 120)]
    pub leak_grace_seconds: u64,
    /// Seconds after an admission touched a MAC's claim during which it is not released: the
    /// admission may still be in flight (the webhooks' timeout is 10 s, plus clock skew).
    #[arg(long, env = "VM_DHCP_ADMISSION_WINDOW_SECONDS", default_value_t = 12)]
    pub admission_window_seconds: u64,
    /// A pool status lists its allocations (`status.ipv4.allocated`, `owners`,
    /// `staticAddresses`) up to this many; above, only the counts and a condition.
    #[arg(long, env = "VM_DHCP_STATUS_MAX_ALLOCATIONS", default_value_t = vm_dhcp_core::store::PROJECTION_MAX_ENTRIES)]
    pub status_max_allocations: usize,
    /// Seconds between passes over every IPPool and NAD (a pool's pass sweeps its leaks;
    /// each is also reconciled on every change of what it reads).
    #[arg(long, env = "VM_DHCP_RESYNC_SECONDS", default_value_t = 30)]
    pub resync_seconds: u64,
    /// Seconds between passes over every VM and vmnetcfg: insurance only, as each is also
    /// reconciled on every change of its own (a pass at 10,000 VMs is 10,000 reconciles).
    #[arg(long, env = "VM_DHCP_WORKLOAD_RESYNC_SECONDS", default_value_t = 600)]
    pub workload_resync_seconds: u64,
    /// Seconds one reconcile (its reads and writes) may take before it is abandoned and
    /// retried; every Kubernetes request is also bounded by the client's timeouts.
    #[arg(long, env = "VM_DHCP_RECONCILE_TIMEOUT_SECONDS", default_value_t = 30)]
    pub reconcile_timeout_seconds: u64,
    /// Seconds the leader may fail every reconcile before /readyz says it is not ready.
    #[arg(long, env = "VM_DHCP_UNREADY_AFTER_SECONDS", default_value_t = 30)]
    pub unready_after_seconds: u64,
    /// Reconciles run at once (never two of one object): most wait on the apiserver.
    #[arg(long, env = "VM_DHCP_WORKERS", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: u16,
    /// Lease duration the agents use (passed to them).
    #[arg(
        long,
        env = "VM_DHCP_AGENT_LEASE_DURATION_SECONDS",
        default_value_t = 5
    )]
    pub agent_lease_duration_seconds: u64,
    /// Namespace of the leader-election Lease `vm-dhcp-controllers`.
    #[arg(
        long,
        env = "VM_DHCP_LEADER_ELECTION_NAMESPACE",
        default_value = "kube-system"
    )]
    pub leader_election_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "VM_DHCP_LEADER_ELECTION_NAME",
        default_value = "vm-dhcp-controllers"
    )]
    pub leader_election_name: String,
    /// Leader-election Lease duration: a standby takes over this long after the leader's
    /// last renewal it observed.
    #[arg(
        long,
        env = "VM_DHCP_LEADER_ELECTION_LEASE_SECONDS",
        default_value_t = 15
    )]
    pub leader_election_lease_seconds: u64,
    /// Identity in the leader Lease (default: host name and pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Watch IPPools, vmnetcfgs, VMs and NADs of this namespace only (default: all).
    #[arg(long, env = "VM_DHCP_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Address of /healthz, /readyz, /metrics and the cache dumps.
    #[arg(
        long,
        env = "VM_DHCP_CONTROLLER_HTTP_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    pub http_addr: SocketAddr,
    /// Kubeconfig, one path or several separated by `:` (default: $KUBECONFIG,
    /// ~/.kube/config, then the in-cluster service account).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    #[arg(long, env = "VM_DHCP_CONTROLLER_DEBUG")]
    pub debug: bool,
}

/// How soon a plan whose write found its object changed is made again (its watch event
/// usually brings the object first).
const RECOMPUTE_AFTER: Duration = Duration::from_millis(250);

/// Writes in flight (or waiting for a slot) per reconcile worker: reconciles write one after
/// another, so this bounds what a migration or a burst may queue.
const WRITES_PER_WORKER: usize = 2;

/// What needs a reconcile.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Key {
    Pool(String, String),
    /// A VM and its vmnetcfg (same namespace and name).
    Workload(String, String),
    Nad(String, String),
}

/// The keys waiting for a reconcile, in key order (pools first: their agents and
/// conditions go ahead of a long pass over the workloads). A key queued twice is
/// reconciled once; a key queued while it is being reconciled waits for that to end, so one
/// object is never reconciled twice at once.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    notify: tokio::sync::Notify,
}

#[derive(Default)]
struct QueueState {
    pending: BTreeSet<Key>,
    running: std::collections::HashSet<Key>,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, key: Key) {
        self.lock().pending.insert(key);
        self.notify.notify_one();
    }

    /// The first pending key not being reconciled, now marked as being reconciled.
    fn next(&self) -> Option<Key> {
        let mut state = self.lock();
        let key = state
            .pending
            .iter()
            .find(|k| !state.running.contains(*k))
            .cloned()?;
        state.pending.remove(&key);
        state.running.insert(key.clone());
        Some(key)
    }

    /// `key`'s reconcile is over (or was dropped).
    fn done(&self, key: &Key) {
        let mut state = self.lock();
        state.running.remove(key);
        if state.pending.contains(key) {
            self.notify.notify_one();
        }
    }

    /// Forgets what was running (the leader's loop was dropped with them).
    fn clear_running(&self) {
        self.lock().running.clear();
    }

    fn len(&self) -> usize {
        self.lock().pending.len()
    }
}

/// The caches, shared by every replica.
#[derive(Clone)]
struct Stores {
    pools: Store<IPPool>,
    cfgs: Store<VirtualMachineNetworkConfig>,
    vms: Store<VirtualMachine>,
    nads: Store<NetworkAttachmentDefinition>,
    pods: Store<Pod>,
    nodes: Store<Node>,
    leases: Store<Lease>,
    claims: Store<IPPoolMACClaim>,
    /// The address objects: the truth of every pool.
    holdings: vm_dhcp_webhook::holdings::WatchedHoldings,
}

pub struct Ctx {
    client: Client,
    args: ControllerArgs,
    stores: Stores,
    queue: Queue,
    orphans: Mutex<OrphanClock>,
    /// Half-made allocations (a crash between the writes of one admission), since when.
    half_made: Mutex<OrphanClock>,
    /// When each pool's status was last projected (projections are batched).
    projected: Mutex<HashMap<(String, String), Instant>>,
    started: Instant,
    /// What the plans depend on, from the flags.
    settings: Settings,
    /// Applies the plans' writes while this replica leads.
    writer: writer::Writer,
    /// Reconciles run, by kind of key (`pool`, `workload`, `nad`).
    reconciles: Family<Vec<(String, String)>, Counter>,
    /// Reconciles that failed (their reads or writes), by kind; each is recomputed later.
    reconcile_failures: Family<Vec<(String, String)>, Counter>,
    /// How long reconciles took (reads, decisions, writes), by kind.
    reconcile_seconds: Family<Vec<(String, String)>, Histogram>,
    ready: AtomicBool,
    /// This replica holds the leader Lease (always, without leader election).
    leading: AtomicBool,
    /// Whether the leader's writes go through (readiness).
    health: WriteHealth,
    /// Who may hold an address, by network (fed by the VM and vmnetcfg watches).
    owners: Mutex<OwnerIndex>,
    /// What placement last read of each Node (heartbeats alone wake nothing).
    node_prints: Mutex<HashMap<String, u64>>,
    /// Each agent Lease's holder (renewals alone wake nothing).
    lease_holders: Mutex<HashMap<String, Option<String>>>,
}

impl Ctx {
    fn pool_for_network(&self, network: &str) -> Option<Arc<IPPool>> {
        let network = network_key(network);
        self.stores.pools.state().into_iter().find(|p| {
            p.meta().deletion_timestamp.is_none() && network_key(&p.spec.network_name) == network
        })
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, OwnerIndex> {
        self.owners.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn forget_clocks(&self) {
        *self.orphans.lock().unwrap_or_else(|e| e.into_inner()) = OrphanClock::default();
        *self.half_made.lock().unwrap_or_else(|e| e.into_inner()) = OrphanClock::default();
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Applies a plan's writes in order. A write that must wait, or that found its object
    /// changed (or the Lease lost), ends the plan: the key is planned again, after the wait
    /// or from what the caches show by then. The writes after it may depend on it (a
    /// vmnetcfg's finalizer goes only after its releases are done).
    async fn apply(self: &Arc<Self>, key: Key, plan: Plan) -> Result<()> {
        for warning in &plan.warnings {
            tracing::warn!(?key, "{warning}");
        }
        if let Some(after) = plan.recheck {
            self.requeue_after(key.clone(), after);
        }
        for write in &plan.writes {
            match self.writer.apply(write).await? {
                Applied::Done => {
                    if let Write::PoolStatus {
                        pool,
                        projected: true,
                        ..
                    } = write
                    {
                        self.projected
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(pool.clone(), Instant::now());
                    }
                }
                Applied::Wait(after) => {
                    tracing::debug!(?key, write = write.kind(), ?after, "waits");
                    self.requeue_after(key, after);
                    return Ok(());
                }
                Applied::Recompute(why) => {
                    tracing::debug!(?key, write = write.kind(), %why, "planned again");
                    self.requeue_after(key, RECOMPUTE_AFTER);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn requeue_after(self: &Arc<Self>, key: Key, after: Duration) {
        let ctx = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            ctx.queue.push(key);
        });
    }

    fn enqueue_all(&self) {
        self.enqueue_pools_and_nads();
        self.enqueue_workloads();
    }

    fn enqueue_pools_and_nads(&self) {
        for p in self.stores.pools.state() {
            self.queue
                .push(Key::Pool(p.namespace().unwrap_or_default(), p.name_any()));
        }
        for n in self.stores.nads.state() {
            self.queue
                .push(Key::Nad(n.namespace().unwrap_or_default(), n.name_any()));
        }
    }

    fn enqueue_workloads(&self) {
        for v in self.stores.vms.state() {
            self.queue.push(Key::Workload(
                v.namespace().unwrap_or_default(),
                v.name_any(),
            ));
        }
        for c in self.stores.cfgs.state() {
            self.queue.push(Key::Workload(
                c.namespace().unwrap_or_default(),
                c.name_any(),
            ));
        }
    }

    /// VMs or vmnetcfgs a relist no longer carries (deleted while the watch was down, with
    /// no event): their workloads are reconciled (a VM gone takes its vmnetcfg and its
    /// addresses with it), and the pools whose owners changed.
    fn vanished(&self, gone: Vec<Source>, networks: BTreeSet<String>) {
        for source in gone {
            let (Source::Vm { namespace, name } | Source::Cfg { namespace, name }) = source;
            tracing::info!(workload = %format!("{namespace}/{name}"), "gone from a relist: deleted while the watch was down");
            self.queue.push(Key::Workload(namespace, name));
        }
        self.enqueue_pools_of_networks(networks);
    }

    fn enqueue_pools_of_networks(&self, networks: BTreeSet<String>) {
        for n in networks {
            self.enqueue_pools_of_network(&n);
        }
    }

    fn enqueue_pools_of_network(&self, network: &str) {
        let network = network_key(network);
        for p in self.stores.pools.state() {
            if network_key(&p.spec.network_name) == network {
                self.queue
                    .push(Key::Pool(p.namespace().unwrap_or_default(), p.name_any()));
            }
        }
    }
}

fn get<K>(store: &Store<K>, ns: &str, name: &str) -> Option<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store.get(&ObjectRef::new(name).within(ns))
}

/// What a watch saw.
enum Seen<'a, K> {
    /// Added or changed (also each object of a relist).
    Apply(&'a K),
    Deleted(&'a K),
    /// A relist starts: deletions during a gap come as absences from it.
    RelistBegin,
    RelistDone,
}

/// Starts a reflector whose events go through `on_event`; returns its store.
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    ctx_slot: Arc<std::sync::OnceLock<Arc<Ctx>>>,
    on_event: fn(&Ctx, Seen<'_, K>),
) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + k8s_openapi::serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    // The caches keep what the controller reads: not the field managers' bookkeeping nor
    // kubectl's copy of the last applied object (at 10,000 VMs, most of the memory).
    let trimmed = watcher(api, config).modify(|o: &mut K| {
        o.meta_mut().managed_fields = None;
        if let Some(a) = o.meta_mut().annotations.as_mut() {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    });
    let stream = reflector::reflector(writer, trimmed).default_backoff();
    let kind = K::kind(&()).to_string();
    tokio::spawn(async move {
        // The stream is not polled before the context exists, so that no event (the owner
        // index is built from them) goes unseen.
        let ctx = loop {
            if let Some(ctx) = ctx_slot.get() {
                break ctx.clone();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        futures_util::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            let seen = match &event {
                Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) => Seen::Apply(obj),
                Ok(watcher::Event::Delete(obj)) => Seen::Deleted(obj),
                Ok(watcher::Event::Init) => Seen::RelistBegin,
                Ok(watcher::Event::InitDone) => Seen::RelistDone,
                Err(e) => {
                    tracing::warn!(%kind, error = %e, "watch failed; retrying");
                    continue;
                }
            };
            on_event(&ctx, seen);
        }
    });
    store
}

/// The object of an add, change or delete; `None` for relist brackets.
fn object<'a, K>(seen: &Seen<'a, K>) -> Option<&'a K> {
    match seen {
        Seen::Apply(o) | Seen::Deleted(o) => Some(o),
        Seen::RelistBegin | Seen::RelistDone => None,
    }
}

fn on_pool(ctx: &Ctx, seen: Seen<'_, IPPool>) {
    if let Some(p) = object(&seen) {
        ctx.queue
            .push(Key::Pool(p.namespace().unwrap_or_default(), p.name_any()));
    }
}

/// A VM or vmnetcfg change reconciles its workload; the pools of a network only when the
/// owners there changed (a status write, the controller's own, changes none).
fn on_owner<K: Resource>(
    ctx: &Ctx,
    seen: Seen<'_, K>,
    kind: Kind,
    apply: fn(&mut OwnerIndex, &K) -> BTreeSet<String>,
) {
    let (obj, changed) = match seen {
        Seen::Apply(o) => (o, apply(&mut ctx.owners(), o)),
        Seen::Deleted(o) => {
            let source = kind.source(o.namespace().unwrap_or_default(), o.name_any());
            (o, ctx.owners().remove(&source))
        }
        Seen::RelistBegin => return ctx.owners().relist_begin(kind),
        Seen::RelistDone => {
            let (gone, changed) = ctx.owners().relist_done(kind);
            return ctx.vanished(gone, changed);
        }
    };
    ctx.queue.push(Key::Workload(
        obj.namespace().unwrap_or_default(),
        obj.name_any(),
    ));
    ctx.enqueue_pools_of_networks(changed);
}

fn on_cfg(ctx: &Ctx, seen: Seen<'_, VirtualMachineNetworkConfig>) {
    on_owner(ctx, seen, Kind::Cfg, OwnerIndex::apply_cfg);
}

fn on_vm(ctx: &Ctx, seen: Seen<'_, VirtualMachine>) {
    on_owner(ctx, seen, Kind::Vm, OwnerIndex::apply_vm);
}

fn on_nad(ctx: &Ctx, seen: Seen<'_, NetworkAttachmentDefinition>) {
    if let Some(n) = object(&seen) {
        let ns = n.namespace().unwrap_or_default();
        ctx.queue.push(Key::Nad(ns.clone(), n.name_any()));
        ctx.enqueue_pools_of_network(&format!("{ns}/{}", n.name_any()));
    }
}

fn on_claim(ctx: &Ctx, seen: Seen<'_, IPPoolMACClaim>) {
    if let Some(c) = object(&seen) {
        ctx.queue.push(Key::Pool(
            c.namespace().unwrap_or_default(),
            c.spec.ippool.clone(),
        ));
    }
}

fn on_pod(ctx: &Ctx, seen: Seen<'_, Pod>) {
    let Some(p) = object(&seen) else { return };
    let labels = p.labels();
    if let (Some(ns), Some(name)) = (
        labels.get(decide::POOL_NAMESPACE_LABEL),
        labels.get(decide::POOL_NAME_LABEL),
    ) {
        ctx.queue.push(Key::Pool(ns.clone(), name.clone()));
    }
}

/// What placement reads of a Node: its labels, schedulability, taints and the status of
/// its conditions — not the heartbeat times a kubelet refreshes every few seconds.
fn node_fingerprint(node: &Node) -> u64 {
    let mut parts: Vec<String> = Vec::new();
    for (k, v) in node.labels() {
        parts.push(format!("l:{k}={v}"));
    }
    if let Some(spec) = &node.spec {
        parts.push(format!("u:{:?}", spec.unschedulable));
        for t in spec.taints.iter().flatten() {
            parts.push(format!("t:{}={:?}:{}", t.key, t.value, t.effect));
        }
    }
    for c in node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
    {
        parts.push(format!("c:{}={}", c.type_, c.status));
    }
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    decide::stable_hash(&refs)
}

/// A Node change wakes the pools only when what placement reads changed (a heartbeat does
/// not): then every pool, since any may place an agent there.
fn on_node(ctx: &Ctx, seen: Seen<'_, Node>) {
    let changed = match &seen {
        Seen::Apply(n) => {
            let print = node_fingerprint(n);
            let mut prints = ctx.node_prints.lock().unwrap_or_else(|e| e.into_inner());
            prints.insert(n.name_any(), print) != Some(print)
        }
        Seen::Deleted(n) => {
            let mut prints = ctx.node_prints.lock().unwrap_or_else(|e| e.into_inner());
            prints.remove(&n.name_any());
            true
        }
        Seen::RelistBegin | Seen::RelistDone => false,
    };
    if changed {
        for p in ctx.stores.pools.state() {
            ctx.queue
                .push(Key::Pool(p.namespace().unwrap_or_default(), p.name_any()));
        }
    }
}

/// An agent Lease wakes its pool only when its holder changes: renewals (every few seconds
/// per agent) change nothing the controller decides.
fn on_lease(ctx: &Ctx, seen: Seen<'_, Lease>) {
    let (name, holder) = match &seen {
        Seen::Apply(l) => (
            l.name_any(),
            l.spec
                .as_ref()
                .and_then(|s| s.holder_identity.clone())
                .filter(|h| !h.is_empty()),
        ),
        Seen::Deleted(l) => (l.name_any(), None),
        Seen::RelistBegin | Seen::RelistDone => return,
    };
    {
        let mut holders = ctx.lease_holders.lock().unwrap_or_else(|e| e.into_inner());
        let deleted = matches!(seen, Seen::Deleted(_));
        let before = if deleted {
            holders.remove(&name)
        } else {
            holders.insert(name.clone(), holder.clone())
        };
        if before.as_ref() == Some(&holder) && !deleted {
            return;
        }
    }
    for p in ctx.stores.pools.state() {
        let ns = p.namespace().unwrap_or_default();
        if decide::lease_name(&ns, &p.name_any()) == name {
            ctx.queue.push(Key::Pool(ns, p.name_any()));
        }
    }
}

fn scoped<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

pub fn run(args: ControllerArgs) -> Result<()> {
    crate::logging::init(args.debug);
    decide::parse_image(&args.image).map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(args))
}

async fn serve(args: ControllerArgs) -> Result<()> {
    let client = crate::kube_client::client(args.kubeconfig.as_deref()).await?;
    let slot: Arc<std::sync::OnceLock<Arc<Ctx>>> = Arc::default();
    let watch_ns = args.watch_namespace.as_deref();
    let agents = watcher::Config::default().labels(&format!(
        "{}={}",
        decide::AGENT_LABEL,
        decide::AGENT_LABEL_VALUE
    ));
    let stores = Stores {
        pools: watch(
            scoped(&client, watch_ns),
            watcher::Config::default(),
            slot.clone(),
            on_pool,
        ),
        cfgs: watch(
            scoped(&client, watch_ns),
            watcher::Config::default(),
            slot.clone(),
            on_cfg,
        ),
        vms: watch(
            scoped(&client, watch_ns),
            watcher::Config::default(),
            slot.clone(),
            on_vm,
        ),
        nads: watch(
            scoped(&client, watch_ns),
            watcher::Config::default(),
            slot.clone(),
            on_nad,
        ),
        pods: watch(
            Api::namespaced(client.clone(), &args.namespace),
            agents,
            slot.clone(),
            on_pod,
        ),
        nodes: watch(
            Api::all(client.clone()),
            watcher::Config::default(),
            slot.clone(),
            on_node,
        ),
        leases: watch(
            Api::namespaced(client.clone(), &args.namespace),
            watcher::Config::default(),
            slot.clone(),
            on_lease,
        ),
        claims: watch(
            scoped(&client, watch_ns),
            watcher::Config::default(),
            slot.clone(),
            on_claim,
        ),
        holdings: {
            let slot = slot.clone();
            vm_dhcp_webhook::holdings::watch_holdings(
                scoped::<IPPoolAddress>(&client, watch_ns),
                watcher::Config::default(),
                move |(ns, pool), _| {
                    if let Some(ctx) = slot.get() {
                        ctx.queue.push(Key::Pool(ns.clone(), pool.clone()));
                    }
                },
            )
        },
    };
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "vm-dhcp-controller".into());
        format!("{host}-{}", std::process::id())
    });
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: args.name.clone(),
            instance: Some(identity.clone()),
        },
    );
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        args: args.clone(),
        stores,
        queue: Queue::default(),
        orphans: Mutex::new(OrphanClock::default()),
        half_made: Mutex::new(OrphanClock::default()),
        projected: Mutex::new(HashMap::new()),
        started: Instant::now(),
        settings: Settings {
            namespace: args.namespace.clone(),
            image: args.image.clone(),
            service_account: args.service_account_name.clone(),
            agents_per_pool: args.agents_per_pool,
            no_agent: args.no_agent,
            no_dhcp: args.no_dhcp,
            agent_lease_duration_seconds: args.agent_lease_duration_seconds,
            lost_node_grace: Duration::from_secs(args.lost_node_grace_seconds),
            agents_on_witness_nodes: args.agents_on_witness_nodes,
            leak_grace: Duration::from_secs(args.leak_grace_seconds),
            status_max_allocations: args.status_max_allocations,
        },
        writer: writer::Writer::new(
            client.clone(),
            args.namespace.clone(),
            Duration::from_secs(args.admission_window_seconds),
            recorder,
            usize::from(args.workers) * WRITES_PER_WORKER,
        ),
        reconciles: Family::default(),
        reconcile_failures: Family::default(),
        reconcile_seconds: Family::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.002, 2.0, 14))
        }),
        ready: AtomicBool::new(false),
        leading: AtomicBool::new(args.no_leader_election),
        health: WriteHealth::default(),
        owners: Mutex::default(),
        node_prints: Mutex::default(),
        lease_holders: Mutex::default(),
    });
    let _ = slot.set(ctx.clone());

    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("binding {}", args.http_addr))?;
    tracing::info!(addr = %args.http_addr, name = %args.name, "controller serving HTTP");
    let router = http::router(ctx.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });

    let s = &ctx.stores;
    let synced = async {
        s.pools.wait_until_ready().await?;
        s.cfgs.wait_until_ready().await?;
        s.vms.wait_until_ready().await?;
        s.nads.wait_until_ready().await?;
        s.pods.wait_until_ready().await?;
        s.nodes.wait_until_ready().await?;
        s.leases.wait_until_ready().await?;
        s.claims.wait_until_ready().await?;
        s.holdings.clone().wait_until_synced().await;
        Ok::<(), kube::runtime::reflector::store::WriterDropped>(())
    };
    tokio::select! {
        r = synced => r.context("the caches stopped before they were complete")?,
        _ = crate::logging::shutdown_signal() => return Ok(()),
    }
    ctx.ready.store(true, Ordering::SeqCst);
    tracing::info!(
        pools = s.pools.state().len(),
        vmnetcfgs = s.cfgs.state().len(),
        vms = s.vms.state().len(),
        "caches synced"
    );

    if args.no_leader_election {
        ctx.writer.guard.set(Some(None));
        tokio::select! {
            r = reconcile_loop(ctx.clone()) => r,
            _ = crate::logging::shutdown_signal() => Ok(()),
        }
    } else {
        lead(&ctx, &identity).await
    }
}

/// Leader election: reconciles while this replica holds the Lease, stands by otherwise. A
/// replica that loses the Lease (the fence passed: its renewals got no answer in time)
/// drops every in-flight reconcile at once and competes again.
async fn lead(ctx: &Arc<Ctx>, identity: &str) -> Result<()> {
    use crate::lease::{self, LeaseConfig, Role};
    let args = &ctx.args;
    let cfg = LeaseConfig {
        namespace: args.leader_election_namespace.clone(),
        name: args.leader_election_name.clone(),
        identity: identity.to_string(),
        duration: Duration::from_secs(args.leader_election_lease_seconds.max(2)),
    };
    let (role_tx, mut role) = tokio::sync::watch::channel(Role::Standby);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Always eligible: the caches are synced before this starts.
    let (_eligible_tx, eligible_rx) = tokio::sync::watch::channel(true);
    let runner = tokio::spawn(lease::run(
        Api::namespaced(ctx.client.clone(), &cfg.namespace),
        cfg.clone(),
        eligible_rx,
        stop_rx,
        role_tx,
        true,
    ));
    let shutdown = crate::logging::shutdown_signal();
    tokio::pin!(shutdown);
    let mut logged = false;
    let result = loop {
        if !role.borrow_and_update().is_holder() {
            if !logged {
                tracing::info!(lease = %cfg, "another replica leads; standing by (serving metrics and readiness)");
                logged = true;
            }
            tokio::select! {
                changed = role.changed() => {
                    if changed.is_err() {
                        break Err(anyhow::anyhow!("the leader election stopped"));
                    }
                    continue;
                }
                _ = &mut shutdown => break Ok(()),
            }
        }
        logged = false;
        tracing::info!(%identity, "leading: reconciling");
        ctx.writer.guard.set(role.borrow().until().map(Some));
        ctx.leading.store(true, Ordering::SeqCst);
        // What this replica observed while standing by is not a leader's observation.
        ctx.forget_clocks();
        let lost = async {
            loop {
                let until = role.borrow_and_update().until();
                // Every write checks the fence first: none starts after it.
                ctx.writer.guard.set(until.map(Some));
                match until {
                    Some(until) => tokio::select! {
                        _ = tokio::time::sleep_until(until) => return,
                        changed = role.changed() => if changed.is_err() { return },
                    },
                    None => return,
                }
            }
        };
        let r = tokio::select! {
            r = reconcile_loop(ctx.clone()) => Some(r),
            _ = lost => None,
            _ = &mut shutdown => break Ok(()),
        };
        ctx.writer.guard.set(None);
        ctx.leading.store(false, Ordering::SeqCst);
        ctx.health.reset();
        match r {
            Some(r) => break r,
            None => {
                tracing::warn!(lease = %cfg, "leadership lost: in-flight writes dropped; standing by")
            }
        }
    };
    ctx.leading.store(false, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    let _ = runner.await;
    result
}

/// The leader's loop: everything once at start (this is also the start-up sweep), then what
/// changes, plus passes over the pools every `--resync-seconds` and over the workloads every
/// `--workload-resync-seconds`. Up to `--workers` reconciles run at
/// once, each taken from the queue as another ends.
async fn reconcile_loop(ctx: Arc<Ctx>) -> Result<()> {
    // Keys left marked by a loop that was dropped (leadership lost) would never run again.
    ctx.queue.clear_running();
    ctx.enqueue_all();
    let resync = Duration::from_secs(ctx.args.resync_seconds.max(1));
    let workload_resync = Duration::from_secs(ctx.args.workload_resync_seconds.max(1));
    let mut next_resync = tokio::time::Instant::now() + resync;
    let mut next_workload_resync = tokio::time::Instant::now() + workload_resync;
    let mut failures: HashMap<Key, u32> = HashMap::new();
    let mut running = futures_util::stream::FuturesUnordered::new();
    loop {
        while running.len() < usize::from(ctx.args.workers) {
            let Some(key) = ctx.queue.next() else { break };
            running.push(run_one(ctx.clone(), key));
        }
        tokio::select! {
            Some((key, result)) = running.next(), if !running.is_empty() => {
                ctx.queue.done(&key);
                ctx.health.record(&result);
                match result {
                    Ok(()) => {
                        failures.remove(&key);
                    }
                    Err(e) => {
                        let n = failures.entry(key.clone()).or_default();
                        *n += 1;
                        let delay = Duration::from_millis(200 * 2u64.pow((*n).min(7)));
                        tracing::warn!(?key, error = format!("{e:#}"), retry_in = ?delay, "reconcile failed");
                        ctx.requeue_after(key, delay);
                    }
                }
            }
            _ = ctx.queue.notify.notified() => {}
            _ = tokio::time::sleep_until(next_resync) => {
                ctx.enqueue_pools_and_nads();
                next_resync = tokio::time::Instant::now() + resync;
            }
            _ = tokio::time::sleep_until(next_workload_resync) => {
                ctx.enqueue_workloads();
                next_workload_resync = tokio::time::Instant::now() + workload_resync;
            }
        }
    }
}

/// One reconcile of `key`, bounded by `--reconcile-timeout-seconds`.
async fn run_one(ctx: Arc<Ctx>, key: Key) -> (Key, Result<()>) {
    let kind = match &key {
        Key::Pool(..) => "pool",
        Key::Workload(..) => "workload",
        Key::Nad(..) => "nad",
    };
    let labels = vec![("kind".to_string(), kind.to_string())];
    ctx.reconciles.get_or_create(&labels).inc();
    let started = Instant::now();
    let work = async {
        match &key {
            Key::Pool(ns, name) => pool::reconcile(&ctx, ns, name).await,
            Key::Workload(ns, name) => workload::reconcile(&ctx, ns, name).await,
            Key::Nad(ns, name) => pool::reconcile_nad(&ctx, ns, name).await,
        }
    };
    // One stuck call must not hold this key (or a worker) forever.
    let limit = Duration::from_secs(ctx.args.reconcile_timeout_seconds.max(1));
    let result = match tokio::time::timeout(limit, work).await {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!(
            "no answer from the apiserver within {limit:?} (--reconcile-timeout-seconds)"
        )),
    };
    ctx.reconcile_seconds
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    if result.is_err() {
        ctx.reconcile_failures.get_or_create(&labels).inc();
    }
    (key, result)
}

/// Whether the leader's reconciles get through to the apiserver: since when every one has
/// failed, and the last error.
#[derive(Default)]
struct WriteHealth {
    failing: Mutex<Option<(Instant, String)>>,
}

impl WriteHealth {
    /// One reconcile's outcome: a success clears the failing state, a failure starts it
    /// (or keeps its start) with the latest error.
    fn record(&self, result: &Result<()>) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => *failing = None,
            Err(e) => {
                let since = failing.as_ref().map_or_else(Instant::now, |(t, _)| *t);
                *failing = Some((since, format!("{e:#}")));
            }
        }
    }

    fn reset(&self) {
        *self.failing.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// `Some(reason)` when every reconcile has failed for longer than `after`.
    fn stuck(&self, after: Duration) -> Option<String> {
        let failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        let (since, last) = failing.as_ref()?;
        (since.elapsed() > after).then(|| {
            format!(
                "every reconcile has failed for {}s; last: {last}",
                since.elapsed().as_secs()
            )
        })
    }
}

/// Whether an API error is a 409 Conflict (someone wrote first: read again, decide again).
fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

fn now_text() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}
