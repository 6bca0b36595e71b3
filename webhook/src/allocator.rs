//! Allocation through the store (`vm_dhcp_core::store`; README, "The allocation store"): for
//! each NIC, the claim of its MAC (`IPPoolMACClaim`) and the object of its address
//! (`IPPoolAddress`), each created or updated with one small write. Etcd's per-key atomicity replaces any pool-wide guard:
//! admissions in one pool do not wait for each other, and the only contention between
//! replicas is two of them picking the same free address, when the loser picks again.
//!
//! The caches (the claims, and the address objects as a per-pool index) only choose what to
//! try; every decision that matters is made by a create (AlreadyExists), or an update with
//! the resourceVersion it read (Conflict). A refusal decided from the cache is confirmed
//! against the apiserver before it is given.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::reflector::{ObjectRef, Store};
use vm_dhcp_core::PoolLayout;
use vm_dhcp_core::admission::network_key;
use vm_dhcp_core::alloc::{AllocError, AllocRequest, Allocation, MacChoice, generate_mac};
use vm_dhcp_core::crd::{IPPool, IPPoolAddress, IPPoolMACClaim};
use vm_dhcp_core::ipam::IpamError;
use vm_dhcp_core::mac::MacAddr;
use vm_dhcp_core::store::{
    Holding, Holdings, PoolKey, address_object, address_object_name, claim_object,
    claim_object_name, holding_of_address, holding_of_claim, needs_migration,
};

use crate::metrics::Metrics;

/// Writes one NIC may take before the admission gives up (each lost race costs one or two).
const MAX_STEPS: usize = 64;
/// How long an address being created is skipped by other admissions of this replica when
/// the watch has not shown it yet.
const PENDING_FOR: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Alloc(#[from] AllocError),
    #[error("IPPool {pool}: {message}")]
    Pool { pool: String, message: String },
    #[error("could not record the allocation in IPPool {pool}: {message}; retry the request")]
    Api { pool: String, message: String },
}

/// An object this admission created, to delete again if a later NIC fails.
#[derive(Debug, Clone)]
pub enum Made {
    Claim {
        ns: String,
        name: String,
        uid: String,
    },
    Address {
        ns: String,
        name: String,
        uid: String,
    },
}

/// One NIC to allocate: the request and its interface name, if known.
pub struct Nic<'a> {
    pub request: &'a AllocRequest,
    pub interface: Option<&'a str>,
}

/// The webhook's allocation state: caches fed by watches, and the addresses this replica is
/// creating right now.
pub struct Allocator {
    client: kube::Client,
    claims: Store<IPPoolMACClaim>,
    holdings: Arc<Mutex<Holdings>>,
    pending: Arc<Mutex<HashMap<(PoolKey, Ipv4Addr), Instant>>>,
    /// NICs of each pool being allocated by this replica right now.
    in_flight: Mutex<HashMap<PoolKey, usize>>,
    metrics: Metrics,
}

/// Counts one NIC in flight for its pool while it lives.
struct InFlight<'a> {
    counts: &'a Mutex<HashMap<PoolKey, usize>>,
    key: PoolKey,
}

impl<'a> InFlight<'a> {
    fn enter(counts: &'a Mutex<HashMap<PoolKey, usize>>, key: &PoolKey) -> Self {
        *counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default() += 1;
        InFlight {
            counts,
            key: key.clone(),
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// What one admission needs to know about a pool.
struct PoolCtx {
    key: PoolKey,
    network: String,
    layout: PoolLayout,
    label: String,
}

fn code(e: &kube::Error) -> Option<(u16, &str)> {
    match e {
        kube::Error::Api(s) => Some((s.code, s.reason.as_str())),
        _ => None,
    }
}

fn already_exists(e: &kube::Error) -> bool {
    code(e).is_some_and(|(c, r)| c == 409 && r == "AlreadyExists")
}

fn conflict_or_gone(e: &kube::Error) -> bool {
    code(e).is_some_and(|(c, r)| (c == 409 && r != "AlreadyExists") || c == 404)
}

fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v) => Some(v),
        IpAddr::V6(_) => None,
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

impl Allocator {
    pub fn new(
        client: kube::Client,
        claims: Store<IPPoolMACClaim>,
        holdings: Arc<Mutex<Holdings>>,
        pending: Arc<Mutex<HashMap<(PoolKey, Ipv4Addr), Instant>>>,
        metrics: Metrics,
    ) -> Self {
        Allocator {
            client,
            claims,
            holdings,
            pending,
            in_flight: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Allocates every NIC of one pool; what it creates is appended to `made` (the caller
    /// rolls back on a later failure). With `dry_run` nothing is written.
    pub async fn allocate(
        &self,
        pool: &IPPool,
        nics: &[Nic<'_>],
        dry_run: bool,
        made: &mut Vec<Made>,
    ) -> Result<Vec<Allocation>, StoreError> {
        // A pool not yet marked as migrated is read again (the cache may not have seen a
        // status the Go version just wrote); once marked, the cached copy is enough.
        let fresh;
        let pool = if is_marked(pool) {
            pool
        } else {
            let ns = pool.metadata.namespace.clone().unwrap_or_default();
            let name = pool.metadata.name.clone().unwrap_or_default();
            fresh = Api::<IPPool>::namespaced(self.client.clone(), &ns)
                .get(&name)
                .await
                .map_err(|e| StoreError::Api {
                    pool: format!("{ns}/{name}"),
                    message: e.to_string(),
                })?;
            &fresh
        };
        let ctx = pool_ctx(pool)?;
        let mut out = Vec::with_capacity(nics.len());
        for nic in nics {
            let a = if dry_run {
                self.decide_only(&ctx, nic)?
            } else {
                let started = Instant::now();
                let _in_flight = InFlight::enter(&self.in_flight, &ctx.key);
                let a = self.take(&ctx, nic, made).await;
                self.metrics.observe_commit(started.elapsed());
                if a.as_ref().is_ok_and(|a| a.new) {
                    self.metrics.committed(1);
                }
                a?
            };
            out.push(a);
        }
        Ok(out)
    }

    /// Deletes what a failed admission created, newest first, each only if it is still the
    /// object we made (UID precondition). Failures are logged: the controller sweeps what
    /// is left after its grace period.
    pub async fn roll_back(&self, made: Vec<Made>) {
        for m in made.into_iter().rev() {
            self.undo(&m).await;
        }
    }

    /// Deletes one object this admission made, if it is still the one it made.
    async fn undo(&self, m: &Made) {
        let (ns, name, uid, result) = match m {
            Made::Claim { ns, name, uid } => {
                let api: Api<IPPoolMACClaim> = Api::namespaced(self.client.clone(), ns);
                (
                    ns,
                    name,
                    uid,
                    api.delete(name, &precondition(uid)).await.map(|_| ()),
                )
            }
            Made::Address { ns, name, uid } => {
                let api: Api<IPPoolAddress> = Api::namespaced(self.client.clone(), ns);
                (
                    ns,
                    name,
                    uid,
                    api.delete(name, &precondition(uid)).await.map(|_| ()),
                )
            }
        };
        match result {
            Ok(()) => {}
            Err(e) if conflict_or_gone(&e) => {}
            Err(e) => tracing::warn!(%ns, %name, %uid, error = %e,
                "could not roll back an object of a refused admission; the controller sweeps it"),
        }
    }

    /// A pool's address objects as the cache holds them.
    pub fn holdings_of(&self, pool: &IPPool) -> Vec<Holding> {
        let key = (
            pool.metadata.namespace.clone().unwrap_or_default(),
            pool.metadata.name.clone().unwrap_or_default(),
        );
        self.lock_holdings().of_pool(&key).cloned().collect()
    }

    fn cached_claim(&self, ns: &str, name: &str) -> Option<IPPoolMACClaim> {
        self.claims
            .get(&ObjectRef::new(name).within(ns))
            .map(|c| (*c).clone())
    }

    /// The MAC of a request: given, or generated so that nobody else's claim holds it.
    fn mac_of(&self, ctx: &PoolCtx, req: &AllocRequest) -> Result<MacAddr, StoreError> {
        match req.mac {
            MacChoice::Given(mac) => Ok(mac),
            MacChoice::Generate { seed } => Ok(generate_mac(&req.owner, seed, |mac| {
                let claim = self.cached_claim(&ctx.key.0, &claim_object_name(&ctx.key.1, mac))?;
                Some(claim.spec.owner.clone())
            })?),
        }
    }

    fn holder_in_cache(&self, ctx: &PoolCtx, ip: Ipv4Addr) -> Option<Holding> {
        self.lock_holdings().get(&ctx.key, IpAddr::V4(ip)).cloned()
    }

    fn lock_holdings(&self) -> std::sync::MutexGuard<'_, Holdings> {
        self.holdings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Chooses an address: the wanted one if it is free, else the lowest free one that no
    /// admission of this replica is creating and that this one did not find taken.
    fn pick(
        &self,
        ctx: &PoolCtx,
        want: Option<Ipv4Addr>,
        taken: &HashSet<Ipv4Addr>,
    ) -> Result<Ipv4Addr, PickError> {
        self.pick_spread(ctx, want, taken, 0)
    }

    /// As `pick`; after `lost` lost races the address is drawn at random among the lowest
    /// free ones (a window that doubles with each loss), so that replicas racing for the
    /// lowest address stop meeting on every next one.
    fn pick_spread(
        &self,
        ctx: &PoolCtx,
        want: Option<Ipv4Addr>,
        taken: &HashSet<Ipv4Addr>,
        lost: u32,
    ) -> Result<Ipv4Addr, PickError> {
        let mut holdings = self.lock_holdings();
        let index = holdings
            .index(&ctx.key, &ctx.layout)
            .map_err(|e| PickError::Refused(AllocError::Address(e)))?;
        if let Some(w) = want {
            if taken.contains(&w) {
                return Err(PickError::Taken(w));
            }
            return match index.check_static(IpAddr::V4(w)) {
                Ok(()) => Ok(w),
                Err(IpamError::AlreadyAllocated { ip }) => Err(PickError::Taken(ip)),
                Err(e) => Err(PickError::Refused(AllocError::Address(e))),
            };
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = Instant::now() - PENDING_FOR;
        if pending.len() > 4096 {
            pending.retain(|_, since| *since > fresh);
        }
        // Alone, an admission takes the lowest free address. With other NICs of this replica
        // in flight (and so, under load, likely of other replicas too, which this one cannot
        // see), it draws among the lowest free ones, in a window of 16 x (NICs in flight + 1)
        // that doubles with each race it lost: wide enough that what another replica is
        // taking, and what the watch has not shown yet, is rarely hit.
        let in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ctx.key)
            .copied()
            .unwrap_or(0)
            .saturating_sub(1);
        let n = if lost == 0 && in_flight == 0 {
            0
        } else {
            use std::hash::BuildHasher as _;
            let window = (16 * (in_flight + 1)) << lost.min(6);
            let draw = std::collections::hash_map::RandomState::new().hash_one((
                Instant::now(),
                lost,
                taken.len(),
            ));
            (draw as usize) % window
        };
        let ip = index
            .nth_free(n, |ip| {
                taken.contains(&ip)
                    || pending
                        .get(&(ctx.key.clone(), ip))
                        .is_some_and(|since| *since > fresh)
            })
            .map_err(|e| PickError::Refused(AllocError::Address(e)))?;
        pending.insert((ctx.key.clone(), ip), Instant::now());
        Ok(ip)
    }

    /// The decision alone, from the caches (dryRun).
    fn decide_only(&self, ctx: &PoolCtx, nic: &Nic<'_>) -> Result<Allocation, StoreError> {
        let req = nic.request;
        let mac = self.mac_of(ctx, req)?;
        if let Some(claim) = self.cached_claim(&ctx.key.0, &claim_object_name(&ctx.key.1, mac)) {
            let held = holding_of_claim(&claim).map_err(|e| ctx.api(e.to_string()))?;
            check_owner(&claim, req, mac, held.ip)?;
            if let Some(ip) = v4(held.ip)
                && self.holder_in_cache(ctx, ip).is_some_and(|h| h.mac == mac)
            {
                if let Some(w) = req.want.filter(|w| *w != ip) {
                    return Err(AllocError::MacHoldsOther {
                        mac,
                        held: ip,
                        wanted: w,
                    }
                    .into());
                }
                return Ok(Allocation {
                    mac,
                    ip,
                    new: false,
                });
            }
        }
        match self.pick(ctx, req.want, &HashSet::new()) {
            Ok(ip) => {
                // A dry run takes nothing: do not keep the address from real admissions.
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&(ctx.key.clone(), ip));
                Ok(Allocation { mac, ip, new: true })
            }
            Err(PickError::Taken(ip)) => Err(AllocError::AddressTaken {
                ip,
                holder: self.describe(ctx, ip),
            }
            .into()),
            Err(PickError::Refused(e)) => Err(e.into()),
        }
    }

    fn describe(&self, ctx: &PoolCtx, ip: Ipv4Addr) -> String {
        self.holder_in_cache(ctx, ip)
            .map(|h| describe_holding(&h))
            .unwrap_or_else(|| "another MAC".to_string())
    }

    /// One NIC, for real: claim the MAC, then hold the address the claim names.
    async fn take(
        &self,
        ctx: &PoolCtx,
        nic: &Nic<'_>,
        made: &mut Vec<Made>,
    ) -> Result<Allocation, StoreError> {
        let req = nic.request;
        let ns = ctx.key.0.as_str();
        let claims: Api<IPPoolMACClaim> = Api::namespaced(self.client.clone(), ns);
        let addresses: Api<IPPoolAddress> = Api::namespaced(self.client.clone(), ns);
        let mac = self.mac_of(ctx, req)?;
        let claim_name = claim_object_name(&ctx.key.1, mac);
        let api_err = |e: kube::Error| ctx.api(e.to_string());
        // Addresses this admission found held by another MAC.
        let mut taken: HashSet<Ipv4Addr> = HashSet::new();
        let mut claim = self.cached_claim(ns, &claim_name);
        // The claim we hold was written by this admission (its resourceVersion is ours).
        let mut ours = false;
        for _ in 0..MAX_STEPS {
            let Some(current) = claim.take() else {
                // No claim: pick an address and claim the MAC for it.
                let ip = match self.pick(ctx, req.want, &taken) {
                    Ok(ip) => ip,
                    Err(PickError::Taken(ip)) => {
                        // The cache says taken: confirm before refusing.
                        match addresses
                            .get_opt(&address_object_name(&ctx.key.1, IpAddr::V4(ip)))
                            .await
                            .map_err(api_err)?
                        {
                            Some(obj) => {
                                return Err(AllocError::AddressTaken {
                                    ip,
                                    holder: holding_of_address(&obj)
                                        .map(|h| describe_holding(&h))
                                        .unwrap_or_else(|_| "an unreadable object".into()),
                                }
                                .into());
                            }
                            None => ip,
                        }
                    }
                    Err(PickError::Refused(e)) => return Err(e.into()),
                };
                // The claim first: its address object is made only once the claim names it.
                // (Made at once, a replica that dies after both were sent can leave an address
                // object of a MAC whose claim another replica won: the MAC would hold two
                // addresses until the sweep.)
                let h = holding(nic, mac, ip, req.want.is_some());
                let obj = claim_object(ns, &ctx.key.1, &ctx.network, &h, Some(now()));
                match claims.create(&PostParams::default(), &obj).await {
                    Ok(created) => {
                        made.push(made_claim(ns, &claim_name, &created));
                        claim = Some(created);
                        ours = true;
                    }
                    Err(e) if already_exists(&e) => {
                        claim = claims.get_opt(&claim_name).await.map_err(api_err)?;
                        ours = false;
                    }
                    Err(e) => return Err(api_err(e)),
                }
                continue;
            };
            let held = holding_of_claim(&current).map_err(|e| {
                ctx.api(format!(
                    "{e}; delete it (kubectl delete ippoolmacclaims -n {ns} {claim_name}) and retry"
                ))
            })?;
            let Some(held_ip) = v4(held.ip) else {
                return Err(ctx.api(format!(
                    "IPPoolMACClaim {claim_name} names {}, not an IPv4 address",
                    held.ip
                )));
            };
            if !ours {
                // Someone else's claim (or an earlier attempt's): check it may be ours, then
                // touch it, which also moves it to the wanted address when it holds none.
                check_owner(&current, req, mac, held.ip)?;
                let bound = self.bound(ctx, &addresses, held_ip, mac).await?;
                let target = match req.want {
                    Some(w) if w != held_ip && bound => {
                        return Err(AllocError::MacHoldsOther {
                            mac,
                            held: held_ip,
                            wanted: w,
                        }
                        .into());
                    }
                    Some(w) if w != held_ip => {
                        // The claim holds nothing yet: it may move, if `w` can be had at
                        // all (held or not is decided by the create that follows).
                        if let Err(PickError::Refused(e)) = self.pick(ctx, Some(w), &taken) {
                            return Err(e.into());
                        }
                        w
                    }
                    Some(w) => w,
                    None => held_ip,
                };
                let mut touched = current.clone();
                touched.spec.owner = Some(req.owner.clone());
                touched.spec.admitted_at = Some(now());
                touched.spec.address = target.to_string();
                touched.spec.static_ = if target == held_ip {
                    current.spec.static_ || req.want.is_some()
                } else {
                    true
                };
                if touched.spec.interface.is_none() {
                    touched.spec.interface = nic.interface.map(str::to_string);
                }
                match claims
                    .replace(&claim_name, &PostParams::default(), &touched)
                    .await
                {
                    Ok(written) => {
                        claim = Some(written);
                        ours = true;
                    }
                    Err(e) if conflict_or_gone(&e) => {
                        self.metrics.conflict();
                        claim = claims.get_opt(&claim_name).await.map_err(api_err)?;
                    }
                    Err(e) => return Err(api_err(e)),
                }
                continue;
            }
            // Our claim names `held_ip`: make its address object hold the MAC.
            let h = Holding {
                owner: Some(req.owner.clone()),
                ..held.clone()
            };
            let name = address_object_name(&ctx.key.1, IpAddr::V4(held_ip));
            let existing = match self.holder_in_cache(ctx, held_ip) {
                Some(cached) if cached.mac == mac => Some(cached),
                _ => None,
            };
            if let Some(existing) = existing {
                self.adopt(&addresses, &name, &existing, &req.owner).await;
                return Ok(Allocation {
                    mac,
                    ip: held_ip,
                    new: false,
                });
            }
            let obj = address_object(ns, &ctx.key.1, &ctx.network, &h);
            match addresses.create(&PostParams::default(), &obj).await {
                Ok(created) => {
                    made.push(Made::Address {
                        ns: ns.to_string(),
                        name,
                        uid: created.metadata.uid.clone().unwrap_or_default(),
                    });
                    return Ok(Allocation {
                        mac,
                        ip: held_ip,
                        new: true,
                    });
                }
                Err(e) if already_exists(&e) => {}
                Err(e) => return Err(api_err(e)),
            }
            let Some(obj) = addresses.get_opt(&name).await.map_err(api_err)? else {
                claim = Some(current); // released in between: create again
                continue;
            };
            let holder = holding_of_address(&obj).map_err(|e| ctx.api(e.to_string()))?;
            if holder.mac == mac {
                self.adopt(&addresses, &name, &holder, &req.owner).await;
                return Ok(Allocation {
                    mac,
                    ip: held_ip,
                    new: false,
                });
            }
            // Another MAC won this address.
            self.metrics.conflict();
            if req.want.is_some() {
                return Err(AllocError::AddressTaken {
                    ip: held_ip,
                    holder: describe_holding(&holder),
                }
                .into());
            }
            taken.insert(held_ip);
            // Other admissions of this replica skip it too until the watch shows it.
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert((ctx.key.clone(), held_ip), Instant::now());
            let next = match self.pick_spread(ctx, None, &taken, taken.len() as u32) {
                Ok(ip) => ip,
                Err(PickError::Taken(ip)) => {
                    return Err(AllocError::AddressTaken {
                        ip,
                        holder: self.describe(ctx, ip),
                    }
                    .into());
                }
                Err(PickError::Refused(e)) => return Err(e.into()),
            };
            let mut moved = current.clone();
            moved.spec.address = next.to_string();
            match claims
                .replace(&claim_name, &PostParams::default(), &moved)
                .await
            {
                Ok(written) => claim = Some(written),
                Err(e) if conflict_or_gone(&e) => {
                    claim = claims.get_opt(&claim_name).await.map_err(api_err)?;
                    ours = false;
                }
                Err(e) => return Err(api_err(e)),
            }
        }
        Err(ctx.api(format!(
            "{MAX_STEPS} writes lost races with other admissions of MAC {mac}"
        )))
    }

    /// Does the address object of `ip` hold `mac`? The cache answers yes; a no is checked
    /// against the apiserver (the object may be newer than the watch).
    async fn bound(
        &self,
        ctx: &PoolCtx,
        addresses: &Api<IPPoolAddress>,
        ip: Ipv4Addr,
        mac: MacAddr,
    ) -> Result<bool, StoreError> {
        if self.holder_in_cache(ctx, ip).is_some_and(|h| h.mac == mac) {
            return Ok(true);
        }
        let obj = addresses
            .get_opt(&address_object_name(&ctx.key.1, IpAddr::V4(ip)))
            .await
            .map_err(|e| ctx.api(e.to_string()))?;
        Ok(obj
            .and_then(|o| holding_of_address(&o).ok())
            .is_some_and(|h| h.mac == mac))
    }

    /// Records the owner on an address object that holds none or another one (an allocation
    /// migrated without owner, or a VM recreated under a new name with the same MAC).
    async fn adopt(&self, api: &Api<IPPoolAddress>, name: &str, h: &Holding, owner: &str) {
        if h.owner.as_deref() == Some(owner) {
            return;
        }
        let patch = serde_json::json!({"spec": {"owner": owner}});
        if let Err(e) = api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(%name, error = %e, "could not record the owner on the address object");
        }
    }
}

fn made_claim(ns: &str, name: &str, created: &IPPoolMACClaim) -> Made {
    Made::Claim {
        ns: ns.to_string(),
        name: name.to_string(),
        uid: created.metadata.uid.clone().unwrap_or_default(),
    }
}

fn holding(nic: &Nic<'_>, mac: MacAddr, ip: Ipv4Addr, static_: bool) -> Holding {
    Holding {
        ip: IpAddr::V4(ip),
        mac,
        owner: Some(nic.request.owner.clone()),
        static_,
        interface: nic.interface.map(str::to_string),
    }
}

enum PickError {
    /// The address is held (per the cache).
    Taken(Ipv4Addr),
    Refused(AllocError),
}

fn precondition(uid: &str) -> DeleteParams {
    DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    }
}

fn describe_holding(h: &Holding) -> String {
    match &h.owner {
        Some(owner) => format!("{} (owner {owner})", h.mac),
        None => h.mac.to_string(),
    }
}

/// A claim held by another owner is a conflict (a MAC bound in this network by another VM).
fn check_owner(
    claim: &IPPoolMACClaim,
    req: &AllocRequest,
    mac: MacAddr,
    ip: IpAddr,
) -> Result<(), AllocError> {
    match claim.spec.owner.as_deref().filter(|o| !o.is_empty()) {
        Some(owner) if owner != req.owner => Err(AllocError::MacBoundElsewhere {
            mac,
            ip: v4(ip).unwrap_or(Ipv4Addr::UNSPECIFIED),
            owner: owner.to_string(),
        }),
        _ => Ok(()),
    }
}

fn is_marked(pool: &IPPool) -> bool {
    pool.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(vm_dhcp_core::store::STORE_ANNOTATION))
        .is_some_and(|v| v == vm_dhcp_core::store::STORE_OBJECTS)
}

fn pool_ctx(pool: &IPPool) -> Result<PoolCtx, StoreError> {
    let ns = pool.metadata.namespace.clone().unwrap_or_default();
    let name = pool.metadata.name.clone().unwrap_or_default();
    let label = format!("{ns}/{name}");
    let err = |message: String| StoreError::Pool {
        pool: label.clone(),
        message,
    };
    if pool.metadata.deletion_timestamp.is_some() {
        return Err(err("the pool is being deleted".into()));
    }
    if needs_migration(
        pool.metadata.annotations.as_ref(),
        pool.status.as_ref().and_then(|s| s.ipv4.as_ref()),
    ) {
        return Err(err(
            "its allocations are being moved from the pool status to IPPoolAddress objects by vm-dhcp controller; retry in a few seconds".into(),
        ));
    }
    let config = pool
        .spec
        .ipv4_config
        .as_ref()
        .ok_or_else(|| err("spec.ipv4Config is missing".into()))?;
    let layout = PoolLayout::from_config(config).map_err(|e| err(e.to_string()))?;
    Ok(PoolCtx {
        key: (ns, name),
        network: network_key(&pool.spec.network_name),
        layout,
        label,
    })
}

impl PoolCtx {
    fn api(&self, message: String) -> StoreError {
        StoreError::Api {
            pool: self.label.clone(),
            message,
        }
    }
}
