//! The writer: applies the writes a plan lists (`vm_dhcp_core::controller::plan::Write`),
//! only while this replica holds the leader Lease, through a bounded number of slots, each
//! with a timeout, retried with backoff when the apiserver did not answer or was
//! overloaded. A write that finds its object at another version (409) is never retried:
//! the object is planned again from the caches. Writes that delete what a lagging cache
//! may have misread (releases, half-made sweeps, a vmnetcfg of a VM gone) first confirm
//! with the apiserver.

use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use futures_util::StreamExt as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use vm_dhcp_core::controller::plan::{Finalized, LeakSwept, Write};
use vm_dhcp_core::controller::{self as decide, LiveOwners};
use vm_dhcp_core::crd::{IPPool, IPPoolAddress, IPPoolMACClaim, VirtualMachineNetworkConfig};
use vm_dhcp_core::kubevirt::{NetworkAttachmentDefinition, VirtualMachine};
use vm_dhcp_core::mac::MacAddr;
use vm_dhcp_core::store::{self, Holding, PoolKey};

/// How long one write (with the reads that confirm it) may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A migration writes every allocation of a pool: it resumes where it stopped if cut.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(25);
/// Attempts of a write the apiserver did not answer, or answered with 429 or 5xx.
const ATTEMPTS: u32 = 3;
/// Writes in flight while a pool status is migrated into objects.
const MIGRATION_WRITES: usize = 32;

/// What became of one write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Applied {
    /// Written, or nothing was left to write (already so, or gone).
    Done,
    /// Not yet: an admission may be in flight on what it would release.
    Wait(Duration),
    /// Not written: the object changed since it was planned, or the Lease was lost. The
    /// object is planned again from what the caches show then.
    Recompute(String),
}

/// Whether this replica may write: while it leads, until the Lease's fence.
#[derive(Debug, Default)]
pub(super) struct Guard {
    /// `None`: standing by. `Some(None)`: leading with no fence (no leader election).
    /// `Some(Some(t))`: leading until `t`, unless a renewal moves it.
    until: Mutex<Option<Option<tokio::time::Instant>>>,
}

impl Guard {
    pub(super) fn set(&self, until: Option<Option<tokio::time::Instant>>) {
        *self.until.lock().unwrap_or_else(|e| e.into_inner()) = until;
    }

    pub(super) fn holds(&self) -> bool {
        match *self.until.lock().unwrap_or_else(|e| e.into_inner()) {
            None => false,
            Some(None) => true,
            Some(Some(t)) => tokio::time::Instant::now() < t,
        }
    }
}

pub(super) struct Writer {
    client: Client,
    /// Namespace of the agent pods and Leases.
    namespace: String,
    admission_window: Duration,
    recorder: Recorder,
    pub(super) guard: Guard,
    slots: tokio::sync::Semaphore,
    /// Writes waiting for a slot or in flight.
    depth: AtomicI64,
    /// Writes applied, by kind and outcome (`done`, `wait`, `recompute`, `failed`).
    pub(super) writes: Family<Vec<(String, String)>, Counter>,
    /// Time one write took (its confirming reads and retries included), by kind.
    pub(super) seconds: Family<Vec<(String, String)>, Histogram>,
    /// Leaks released, by pool.
    pub(super) swept: Family<Vec<(String, String)>, Counter>,
}

fn precondition(resource_version: Option<String>) -> DeleteParams {
    DeleteParams {
        preconditions: Some(Preconditions {
            resource_version,
            uid: None,
        }),
        ..DeleteParams::default()
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    super::is_conflict(e)
}

fn is_not_found(e: &kube::Error) -> bool {
    super::is_not_found(e)
}

fn already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists")
}

/// Worth another attempt: no answer, or an overloaded or failing apiserver. Not a 4xx: the
/// request itself is what it is.
fn transient(e: &anyhow::Error) -> bool {
    match e.downcast_ref::<kube::Error>() {
        Some(kube::Error::Api(s)) => s.code == 429 || s.code >= 500,
        Some(kube::Error::SerdeError(_)) | Some(kube::Error::BuildRequest(_)) => false,
        Some(_) => true,
        None => false,
    }
}

/// A delete that found nothing to delete did its job.
fn deleted(r: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match r {
        Err(e) if is_not_found(&e) => Ok(()),
        other => other,
    }
}

/// A guarded write that found another version: plan again.
fn guarded(r: Result<(), kube::Error>, what: &str) -> Result<Applied> {
    match r {
        Ok(()) => Ok(Applied::Done),
        Err(e) if is_not_found(&e) => Ok(Applied::Done),
        Err(e) if is_conflict(&e) => Ok(Applied::Recompute(format!("{what}: changed since read"))),
        Err(e) => Err(e).context(what.to_string()),
    }
}

impl Writer {
    pub(super) fn new(
        client: Client,
        namespace: String,
        admission_window: Duration,
        recorder: Recorder,
        slots: usize,
    ) -> Writer {
        Writer {
            client,
            namespace,
            admission_window,
            recorder,
            guard: Guard::default(),
            slots: tokio::sync::Semaphore::new(slots.max(1)),
            depth: AtomicI64::new(0),
            writes: Family::default(),
            seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 15))
            }),
            swept: Family::default(),
        }
    }

    /// Writes waiting for a slot or in flight.
    pub(super) fn depth(&self) -> Gauge<i64> {
        let g = Gauge::<i64>::default();
        g.set(self.depth.load(Ordering::Relaxed));
        g
    }

    fn api<K>(&self, ns: &str) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), ns)
    }

    /// Applies one write: waits for a slot, checks the guard before every attempt, bounds
    /// each attempt with a timeout and retries transient failures with backoff.
    pub(super) async fn apply(&self, w: &Write) -> Result<Applied> {
        self.depth.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = async {
            let _slot = self
                .slots
                .acquire()
                .await
                .map_err(|_| anyhow!("the writer is closed"))?;
            let limit = match w {
                Write::Migrate { .. } => MIGRATION_TIMEOUT,
                _ => WRITE_TIMEOUT,
            };
            let mut attempt = 1;
            loop {
                if !self.guard.holds() {
                    return Ok(Applied::Recompute(
                        "this replica no longer holds the leader Lease".into(),
                    ));
                }
                let error = match tokio::time::timeout(limit, self.write(w)).await {
                    Ok(Ok(applied)) => return Ok(applied),
                    Ok(Err(e)) if transient(&e) => e,
                    Ok(Err(e)) => return Err(e),
                    Err(_) => anyhow!("no answer from the apiserver within {limit:?}"),
                };
                if attempt >= ATTEMPTS || matches!(w, Write::Migrate { .. }) {
                    return Err(error.context(format!("{} write, {attempt} attempt(s)", w.kind())));
                }
                let backoff = Duration::from_millis(200 * 4u64.pow(attempt - 1));
                tracing::debug!(
                    write = w.kind(),
                    error = format!("{error:#}"),
                    ?backoff,
                    "write retried"
                );
                tokio::time::sleep(backoff).await;
                attempt += 1;
            }
        }
        .await;
        self.depth.fetch_sub(1, Ordering::Relaxed);
        let outcome = match &result {
            Ok(Applied::Done) => "done",
            Ok(Applied::Wait(_)) => "wait",
            Ok(Applied::Recompute(_)) => "recompute",
            Err(_) => "failed",
        };
        let kind = vec![("kind".to_string(), w.kind().to_string())];
        self.seconds
            .get_or_create(&kind)
            .observe(started.elapsed().as_secs_f64());
        self.writes
            .get_or_create(&vec![
                ("kind".to_string(), w.kind().to_string()),
                ("outcome".to_string(), outcome.to_string()),
            ])
            .inc();
        result
    }

    async fn write(&self, w: &Write) -> Result<Applied> {
        match w {
            Write::Finalizers {
                kind,
                ns,
                name,
                resource_version,
                finalizers,
            } => {
                let patch = serde_json::json!({"metadata": {
                    "resourceVersion": resource_version, "finalizers": finalizers}});
                let pp = PatchParams::default();
                let r = match kind {
                    Finalized::IPPool => self
                        .api::<IPPool>(ns)
                        .patch(name, &pp, &Patch::Merge(&patch))
                        .await
                        .map(|_| ()),
                    Finalized::Vmnetcfg => self
                        .api::<VirtualMachineNetworkConfig>(ns)
                        .patch(name, &pp, &Patch::Merge(&patch))
                        .await
                        .map(|_| ()),
                };
                guarded(r, &format!("writing the finalizers of {ns}/{name}"))
            }
            Write::NadLabels { ns, name, pool } => {
                let (pool_ns, pool_name) = match pool {
                    Some((a, b)) => (Some(a.as_str()), Some(b.as_str())),
                    None => (None, None),
                };
                let patch = serde_json::json!({"metadata": {"labels": {
                    decide::POOL_NAMESPACE_LABEL: pool_ns, decide::POOL_NAME_LABEL: pool_name}}});
                let r = self
                    .api::<NetworkAttachmentDefinition>(ns)
                    .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ());
                deleted(r)
                    .with_context(|| format!("writing the IPPool labels of NAD {ns}/{name}"))?;
                Ok(Applied::Done)
            }
            Write::CreateAgent(pod) => {
                let name = pod.name_any();
                match self
                    .api::<Pod>(&self.namespace)
                    .create(&PostParams::default(), pod)
                    .await
                {
                    Ok(_) => {
                        let image = pod
                            .spec
                            .as_ref()
                            .and_then(|s| s.containers.first())
                            .and_then(|c| c.image.clone())
                            .unwrap_or_default();
                        tracing::info!(pod = %name, %image, "agent pod created");
                    }
                    Err(e) if is_conflict(&e) => {} // created before; the cache will show it
                    Err(e) => return Err(e).with_context(|| format!("creating agent pod {name}")),
                }
                Ok(Applied::Done)
            }
            Write::DeleteAgent { name, force, why } => {
                let dp = DeleteParams {
                    grace_period_seconds: force.then_some(0),
                    ..DeleteParams::default()
                };
                let r = self
                    .api::<Pod>(&self.namespace)
                    .delete(name, &dp)
                    .await
                    .map(|_| ());
                deleted(r).with_context(|| format!("deleting agent pod {name}"))?;
                if *force {
                    tracing::warn!(pod = %name, "agent pod deleted: {why}");
                } else {
                    tracing::info!(pod = %name, "agent pod deleted: {why}");
                }
                Ok(Applied::Done)
            }
            Write::DeleteAgentLease { name } => {
                let r = self
                    .api::<Lease>(&self.namespace)
                    .delete(name, &DeleteParams::default())
                    .await
                    .map(|_| ());
                deleted(r).context("deleting the agents' Lease")?;
                Ok(Applied::Done)
            }
            Write::DeleteAllocations { pool: (ns, name) } => {
                self.delete_allocations(ns, name).await?;
                tracing::info!(pool = %format!("{ns}/{name}"), "IPPool removed: agents, Lease, NAD labels and allocations cleaned up");
                Ok(Applied::Done)
            }
            Write::Migrate {
                pool,
                network,
                holdings,
            } => {
                self.migrate(pool, network, holdings).await?;
                self.mark_migrated(pool).await?;
                tracing::info!(pool = %format!("{}/{}", pool.0, pool.1), allocations = holdings.len(),
                    "pool status migrated into IPPoolAddress objects");
                Ok(Applied::Done)
            }
            Write::MarkMigrated { pool } => {
                self.mark_migrated(pool).await?;
                Ok(Applied::Done)
            }
            Write::Adopt {
                pool: (ns, name),
                ip,
                mac,
                owner,
            } => {
                let patch = serde_json::json!({"spec": {"owner": owner}});
                let pp = PatchParams::default();
                let a = self
                    .api::<IPPoolAddress>(ns)
                    .patch(
                        &store::address_object_name(name, *ip),
                        &pp,
                        &Patch::Merge(&patch),
                    )
                    .await
                    .map(|_| ());
                deleted(a).context("recording an adopted owner on its address object")?;
                let c = self
                    .api::<IPPoolMACClaim>(ns)
                    .patch(
                        &store::claim_object_name(name, *mac),
                        &pp,
                        &Patch::Merge(&patch),
                    )
                    .await
                    .map(|_| ());
                deleted(c).context("recording an adopted owner on its claim")?;
                tracing::info!(pool = %format!("{ns}/{name}"), %ip, %mac, %owner, "allocation adopted by its owner");
                Ok(Applied::Done)
            }
            Write::Release {
                pool,
                network,
                mac,
                held,
                why,
                leak,
            } => {
                let applied = self.release(pool, network, *mac, *held, why).await?;
                if let (Some(ip), Some(leak)) = (applied.1, leak) {
                    self.report_leak(pool, ip, *mac, leak).await;
                }
                Ok(applied.0)
            }
            Write::SweepHalfMade {
                pool,
                ip,
                mac,
                claimed,
                resource_version,
            } => {
                self.sweep_half_made(pool, *ip, *mac, *claimed, resource_version.clone())
                    .await
            }
            Write::PoolStatus {
                pool: (ns, name),
                resource_version,
                patch,
                ..
            } => {
                let patch = serde_json::json!({
                    "metadata": {"resourceVersion": resource_version},
                    "status": patch,
                });
                let r = self
                    .api::<IPPool>(ns)
                    .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ());
                guarded(r, &format!("writing the status of IPPool {ns}/{name}"))
            }
            Write::CreatePool(pool) => {
                let (ns, name) = (pool.namespace().unwrap_or_default(), pool.name_any());
                match self
                    .api::<IPPool>(&ns)
                    .create(&PostParams::default(), pool)
                    .await
                {
                    Ok(_) => {
                        tracing::info!(nad = %format!("{ns}/{name}"), "IPPool created from the NAD's opt-in annotation")
                    }
                    Err(e) if is_conflict(&e) => {}
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!(
                                "creating the IPPool of NAD {ns}/{name} from its {} annotation; fix the annotation",
                                decide::AUTO_POOL_ANNOTATION
                            )
                        });
                    }
                }
                Ok(Applied::Done)
            }
            Write::DeletePool { ns, name } => {
                tracing::info!(pool = %format!("{ns}/{name}"), "deleting the IPPool created with its NAD: the NAD is gone");
                let r = self
                    .api::<IPPool>(ns)
                    .delete(name, &DeleteParams::default())
                    .await
                    .map(|_| ());
                deleted(r).context("deleting the NAD's IPPool")?;
                Ok(Applied::Done)
            }
            Write::CreateVmnetcfg(cfg) => {
                let (ns, name) = (cfg.namespace().unwrap_or_default(), cfg.name_any());
                match self
                    .api::<VirtualMachineNetworkConfig>(&ns)
                    .create(&PostParams::default(), cfg)
                    .await
                {
                    Ok(_) => {
                        tracing::info!(vmnetcfg = %format!("{ns}/{name}"), "vmnetcfg created for its VM")
                    }
                    Err(e) if is_conflict(&e) => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("creating vmnetcfg {ns}/{name}"));
                    }
                }
                Ok(Applied::Done)
            }
            Write::VmnetcfgSpec {
                ns,
                name,
                resource_version,
                configs,
            } => {
                let patch = serde_json::json!({
                    "metadata": {"resourceVersion": resource_version},
                    "spec": {"networkConfigs": configs}});
                let r = self
                    .api::<VirtualMachineNetworkConfig>(ns)
                    .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ());
                let applied = guarded(r, &format!("updating vmnetcfg {ns}/{name}"))?;
                if applied == Applied::Done {
                    tracing::info!(vmnetcfg = %format!("{ns}/{name}"), "vmnetcfg updated from its VM");
                }
                // A conflict: its update event plans it again.
                Ok(Applied::Done)
            }
            Write::DeleteVmnetcfg {
                ns,
                name,
                uid,
                vm_uid,
            } => {
                // The VMs' watch may lag the vmnetcfgs' (after an outage each backs off on
                // its own; a new leader's caches are its own): the VM is read first.
                let live = self
                    .api::<VirtualMachine>(ns)
                    .get_opt(name)
                    .await
                    .with_context(|| format!("reading VM {ns}/{name}"))?
                    .filter(|v| v.meta().deletion_timestamp.is_none());
                if live.is_some_and(|v| v.uid().as_deref() == Some(vm_uid.as_str())) {
                    return Ok(Applied::Done); // its watch event plans it again
                }
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: uid.clone(),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                match self
                    .api::<VirtualMachineNetworkConfig>(ns)
                    .delete(name, &dp)
                    .await
                {
                    Ok(_) => {
                        tracing::info!(vmnetcfg = %format!("{ns}/{name}"), "VM gone: vmnetcfg deleted")
                    }
                    Err(e) if is_not_found(&e) || is_conflict(&e) => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("deleting vmnetcfg {ns}/{name}"));
                    }
                }
                Ok(Applied::Done)
            }
            Write::VmnetcfgStatus { ns, name, patch } => {
                let patch = serde_json::json!({"status": patch});
                let r = self
                    .api::<VirtualMachineNetworkConfig>(ns)
                    .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ());
                deleted(r)
                    .with_context(|| format!("writing the status of vmnetcfg {ns}/{name}"))?;
                Ok(Applied::Done)
            }
        }
    }

    /// Deletes every address object and claim of a pool that is going away.
    async fn delete_allocations(&self, ns: &str, name: &str) -> Result<()> {
        let selector = format!("{}={}", store::POOL_LABEL, decide::shorten(name, 63));
        let lp = ListParams::default().labels(&selector);
        self.api::<IPPoolAddress>(ns)
            .delete_collection(&DeleteParams::default(), &lp)
            .await
            .with_context(|| format!("deleting the address objects of IPPool {ns}/{name}"))?;
        self.api::<IPPoolMACClaim>(ns)
            .delete_collection(&DeleteParams::default(), &lp)
            .await
            .with_context(|| format!("deleting the MAC claims of IPPool {ns}/{name}"))?;
        Ok(())
    }

    /// Each allocation as the webhook makes it (claim, then address object), many at once,
    /// idempotently.
    async fn migrate(
        &self,
        (ns, name): &PoolKey,
        network: &str,
        holdings: &[Holding],
    ) -> Result<()> {
        let claims = self.api::<IPPoolMACClaim>(ns);
        let addresses = self.api::<IPPoolAddress>(ns);
        let created = |r: Result<(), kube::Error>| match r {
            Err(e) if already_exists(&e) => Ok(()),
            other => other,
        };
        let results: Vec<Result<()>> = futures_util::stream::iter(holdings)
            .map(|h| {
                let (claims, addresses) = (&claims, &addresses);
                async move {
                    let claim = store::claim_object(ns, name, network, h, None);
                    created(
                        claims
                            .create(&PostParams::default(), &claim)
                            .await
                            .map(|_| ()),
                    )
                    .with_context(|| format!("migrating {} of IPPool {ns}/{name}", h.ip))?;
                    let obj = store::address_object(ns, name, network, h);
                    created(
                        addresses
                            .create(&PostParams::default(), &obj)
                            .await
                            .map(|_| ()),
                    )
                    .with_context(|| format!("migrating {} of IPPool {ns}/{name}", h.ip))
                }
            })
            .buffer_unordered(MIGRATION_WRITES)
            .collect()
            .await;
        results.into_iter().collect()
    }

    async fn mark_migrated(&self, (ns, name): &PoolKey) -> Result<()> {
        let patch = serde_json::json!({"metadata": {"annotations": {
            store::STORE_ANNOTATION: store::STORE_OBJECTS}}});
        self.api::<IPPool>(ns)
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("marking IPPool {ns}/{name} as migrated"))?;
        Ok(())
    }

    /// Gives back what one MAC holds in a pool: its claim first, then the address object, each
    /// only if it is still the version read here. Safe against a re-admission of the MAC (a
    /// VM deleted and recreated under its name), which touches the claim before its object is
    /// stored: a claim touched within the admission window waits, the owners the claim and
    /// the address object name are looked up with quorum reads, and a claim touched since it
    /// was read fails the delete's precondition. Returns the address released.
    ///
    /// The claim and the address object are read from the apiserver, not the caches: the
    /// watches lag each other after an outage or under load (each backs off on its own). A
    /// claim the cache has not seen yet is not a claim that is gone (taken for gone, it
    /// skipped the owner's check and a live VM's address object was deleted); an address
    /// object the cache has not seen yet, or saw at an older version, is still to be
    /// released (taken as it was, the release did nothing or failed its precondition, the
    /// vmnetcfg's finalizer went anyway, and the address stayed held until the leak sweep).
    /// An address object changed since it was read is planned again.
    async fn release(
        &self,
        (ns, pool): &PoolKey,
        network: &str,
        mac: MacAddr,
        held: Option<IpAddr>,
        why: &str,
    ) -> Result<(Applied, Option<IpAddr>)> {
        let claims = self.api::<IPPoolMACClaim>(ns);
        let claim_name = store::claim_object_name(pool, mac);
        let claim = claims
            .get_opt(&claim_name)
            .await
            .with_context(|| format!("reading the claim of MAC {mac} in IPPool {ns}/{pool}"))?;
        // The addresses: the one the claim names and the one the cache saw (the same, unless
        // one of them is out of date), each as the apiserver holds it now.
        let mut ips: Vec<IpAddr> = claim
            .as_ref()
            .and_then(|c| c.spec.address.parse::<IpAddr>().ok())
            .into_iter()
            .collect();
        if let Some(ip) = held
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
        let mut addresses = Vec::new();
        for ip in ips {
            addresses.extend(self.address_held_by(ns, pool, ip, mac).await?);
        }
        let gate = decide::release_gate(
            claim.as_ref().map(|c| decide::ClaimSeen {
                admitted_at: c.spec.admitted_at.as_deref(),
                owner: c.spec.owner.as_deref(),
            }),
            addresses.iter().filter_map(|(h, _)| h.owner.as_deref()),
            Timestamp::now(),
            self.admission_window,
        );
        let owners = match gate {
            decide::ReleaseGate::Wait(wait) => {
                return Ok((Applied::Wait(wait + Duration::from_millis(200)), None));
            }
            decide::ReleaseGate::Confirm(owners) => owners,
        };
        for owner in owners {
            if self.owner_holds(&owner, network, mac).await? {
                return Ok((Applied::Done, None));
            }
        }
        if let Some(claim) = &claim {
            match claims
                .delete(&claim_name, &precondition(claim.resource_version()))
                .await
            {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) if is_conflict(&e) => return Ok((Applied::Done, None)), // admitted again
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("releasing MAC {mac} in IPPool {ns}/{pool}"));
                }
            }
        }
        let mut released = None;
        for (held, version) in addresses {
            let ip = held.ip;
            let name = store::address_object_name(pool, ip);
            match self
                .api::<IPPoolAddress>(ns)
                .delete(&name, &precondition(version))
                .await
            {
                Ok(_) => {
                    tracing::info!(pool = %format!("{ns}/{pool}"), %ip, %mac, %why, "address released");
                    released = Some(ip);
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) if is_conflict(&e) => {
                    let why = format!("{name}: changed since read");
                    return Ok((Applied::Recompute(why), released));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("releasing {ip} in IPPool {ns}/{pool}"));
                }
            }
        }
        Ok((Applied::Done, released))
    }

    /// The address object of `ip` in a pool, per a quorum read, with its resourceVersion, if
    /// it is held by `mac` (another MAC's object is not this release's to delete).
    async fn address_held_by(
        &self,
        ns: &str,
        pool: &str,
        ip: IpAddr,
        mac: MacAddr,
    ) -> Result<Option<(Holding, Option<String>)>> {
        let obj = self
            .api::<IPPoolAddress>(ns)
            .get_opt(&store::address_object_name(pool, ip))
            .await
            .with_context(|| format!("reading the address object of {ip} in IPPool {ns}/{pool}"))?;
        Ok(obj.and_then(|o| {
            let h = store::holding_of_address(&o).ok()?;
            (h.mac == mac).then(|| (h, o.resource_version()))
        }))
    }

    /// Does the owner (`<namespace>/<name>`) still hold the MAC on the network, per a quorum
    /// read of its VM and vmnetcfg (the caches may not have seen a VM recreated a moment ago)?
    async fn owner_holds(&self, owner: &str, network: &str, mac: MacAddr) -> Result<bool> {
        let Some((ns, name)) = owner.split_once('/') else {
            return Ok(false);
        };
        let mut live = LiveOwners::default();
        if let Some(vm) = self
            .api::<VirtualMachine>(ns)
            .get_opt(name)
            .await
            .with_context(|| format!("reading VM {owner}"))?
            .filter(|v| v.meta().deletion_timestamp.is_none())
        {
            live.add_vm(&vm);
        }
        if let Some(cfg) = self
            .api::<VirtualMachineNetworkConfig>(ns)
            .get_opt(name)
            .await
            .with_context(|| format!("reading vmnetcfg {owner}"))?
            .filter(|c| c.meta().deletion_timestamp.is_none())
        {
            for e in cfg.spec.network_configs.iter().flatten() {
                if let Ok(m) = e.mac_address.parse::<MacAddr>() {
                    live.insert(&e.network_name, m, owner.to_string());
                }
            }
        }
        Ok(live.get(network, mac).is_some())
    }

    async fn report_leak(&self, (ns, name): &PoolKey, ip: IpAddr, mac: MacAddr, leak: &LeakSwept) {
        let key = format!("{ns}/{name}");
        tracing::warn!(pool = %key, %ip, %mac, grace_seconds = leak.grace.as_secs(),
            "leak swept: no vmnetcfg entry or VM NIC holds this allocation; released");
        self.swept
            .get_or_create(&vec![("ippool".to_string(), key)])
            .inc();
        let event = Event {
            type_: EventType::Warning,
            reason: "LeakSwept".into(),
            note: Some(format!(
                "released {ip} held by {mac}: no vmnetcfg entry or VM NIC on {} has had that MAC for {}s",
                leak.network,
                leak.grace.as_secs()
            )),
            action: "Release".into(),
            secondary: None,
        };
        let pool_ref = ObjectReference {
            api_version: Some(IPPool::api_version(&()).into_owned()),
            kind: Some(IPPool::kind(&()).into_owned()),
            namespace: Some(ns.clone()),
            name: Some(name.clone()),
            uid: leak.pool_uid.clone(),
            ..ObjectReference::default()
        };
        if let Err(e) = self.recorder.publish(&event, &pool_ref).await {
            tracing::warn!(error = %e, "could not record the LeakSwept Event");
        }
    }

    /// Deletes one half-made allocation, unless the apiserver holds its other half: the
    /// claims and the address objects come from two watches that can lag each other by
    /// seconds.
    async fn sweep_half_made(
        &self,
        (ns, name): &PoolKey,
        ip: std::net::Ipv4Addr,
        mac: MacAddr,
        claimed: Option<IpAddr>,
        version: Option<String>,
    ) -> Result<Applied> {
        let claims = self.api::<IPPoolMACClaim>(ns);
        let addresses = self.api::<IPPoolAddress>(ns);
        let other_half = if ip.is_unspecified() {
            match claimed {
                None => false,
                Some(claimed) => addresses
                    .get_opt(&store::address_object_name(name, claimed))
                    .await
                    .context("reading the address object of a claim that looked half-made")?
                    .as_ref()
                    .and_then(|o| store::holding_of_address(o).ok())
                    .is_some_and(|h| h.mac == mac),
            }
        } else {
            claims
                .get_opt(&store::claim_object_name(name, mac))
                .await
                .context("reading the claim of an address object that looked half-made")?
                .as_ref()
                .and_then(|o| store::holding_of_claim(o).ok())
                .is_some_and(|h| h.ip == IpAddr::V4(ip))
        };
        if other_half {
            return Ok(Applied::Done);
        }
        let r = if ip.is_unspecified() {
            claims
                .delete(&store::claim_object_name(name, mac), &precondition(version))
                .await
                .map(|_| ())
        } else {
            addresses
                .delete(
                    &store::address_object_name(name, IpAddr::V4(ip)),
                    &precondition(version),
                )
                .await
                .map(|_| ())
        };
        match r {
            Ok(()) => tracing::warn!(pool = %format!("{ns}/{name}"), %ip, %mac,
                "half-made allocation swept (an admission stopped between its two writes)"),
            Err(e) if is_not_found(&e) || is_conflict(&e) => {}
            Err(e) => return Err(e).context("sweeping a half-made allocation"),
        }
        Ok(Applied::Done)
    }
}
