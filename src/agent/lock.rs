//! Active/standby: only the holder of one coordination.k8s.io/v1 Lease answers DHCP and,
//! with `--manage-server-ip`, holds the pool's server IP.
//!
//! The safety argument, which every rule below serves: a standby takes the Lease only after
//! it has seen the record unchanged for a whole lease duration *on its own clock* (and the
//! record's renewTime is that old too), while the holder stops answering and drops the IP
//! once `duration − margin` has passed since it *sent* its last successful renewal. The
//! renewal the standby last saw was sent after the holder's deadline started counting, so
//! the holder has always let go before the standby may take over — whatever the clocks
//! of the two nodes say, as long as they tick at about the same rate.
//!
//! Writes use the object's resourceVersion: of two standbys racing for an expired Lease,
//! one gets 409 Conflict and stays standby.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use kube::runtime::WatchStreamExt;
use tokio::sync::watch;
use tokio::time::Instant;

use super::cluster::ObjectRef;
use super::netif::{self, ServerAddr};
use super::{AgentState, stopped};

#[derive(Debug, Clone)]
pub struct LockConfig {
    pub lease: ObjectRef,
    /// holderIdentity: the pod name the controller passes as `--name`.
    pub identity: String,
    pub duration: Duration,
    /// The interface whose server IP the holder manages (`--manage-server-ip`).
    pub manage_ip_on: Option<String>,
}

impl LockConfig {
    /// Renew three times per lease duration, so that one lost request is not a failover.
    fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    /// How long before the Lease could expire elsewhere the holder lets go: room for the
    /// `ip addr del` and for a slow clock.
    fn margin(&self) -> Duration {
        (self.duration / 5).max(Duration::from_millis(500))
    }

    /// Every API call is bounded, so that a hung connection cannot outlive the fence.
    fn request_timeout(&self) -> Duration {
        self.renew_every()
    }
}

/// Why a write of the Lease did not make us (or keep us) the holder.
enum Refused {
    /// Someone else wrote the Lease first (409), or holds it.
    Conflict,
    Error(anyhow::Error),
}

impl From<kube::Error> for Refused {
    fn from(e: kube::Error) -> Self {
        match &e {
            kube::Error::Api(s) if s.code == 409 => Refused::Conflict,
            _ => Refused::Error(e.into()),
        }
    }
}

fn micro_now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// The server IP the table asks for.
fn wanted_addr(state: &AgentState) -> Option<ServerAddr> {
    state.current_table().map(|t| ServerAddr {
        ip: t.options().server_ip,
        prefix: t.options().subnet.prefix_len(),
    })
}

/// What this agent has configured on the interface (when it manages the IP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Not known yet (at start: a previous run in this pod may have left the IP behind).
    Unknown,
    Nothing,
    Addr(ServerAddr),
}

struct Lock {
    api: Api<Lease>,
    cfg: LockConfig,
    state: Arc<AgentState>,
    /// The Lease as we last wrote or read it.
    last: Option<Lease>,
    /// When the record last changed, on our clock (the standby's expiry rule).
    last_change: Instant,
    /// Holder only: when we must have let go unless a renewal succeeds first.
    fence: Option<Instant>,
    held: Held,
}

pub async fn run(
    api: Api<Lease>,
    cfg: LockConfig,
    state: Arc<AgentState>,
    stop: watch::Receiver<bool>,
) {
    let mut lock = Lock {
        api,
        cfg,
        state,
        last: None,
        last_change: Instant::now(),
        fence: None,
        held: Held::Unknown,
    };
    lock.set_active(false);
    let mut tables = lock.state.table.subscribe();
    // The Lease is watched as well as polled: a standby sees each renewal when it happens,
    // so it can take over right when the Lease expires instead of at its next poll.
    let events =
        kube::runtime::watcher::watch_object(lock.api.clone(), &lock.cfg.lease.name.clone())
            .default_backoff();
    tokio::pin!(events);
    let stop = stopped(stop);
    tokio::pin!(stop);
    let mut next = Instant::now();
    loop {
        let wake = match lock.fence {
            Some(fence) => next.min(fence),
            None => next,
        };
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep_until(wake) => {}
            event = events.next() => {
                match event {
                    Some(Ok(Some(lease))) => {
                        if let Some(expiry) = lock.seen(lease).await {
                            next = next.min(expiry);
                        }
                    }
                    Some(Ok(None)) => {}
                    Some(Err(e)) => tracing::debug!("watching the Lease: {e}; polling meanwhile"),
                    // The watch never ends by itself; polling carries on if it does.
                    None => std::future::pending::<()>().await,
                }
                continue;
            }
            // A new server IP in the pool is applied at once, not at the next tick.
            changed = tables.changed() => {
                if changed.is_err() {
                    break;
                }
                lock.reconcile_ip().await;
                continue;
            }
        }
        if lock.fence.is_some_and(|f| Instant::now() >= f) {
            lock.step_down("the Lease could not be renewed in time")
                .await;
        }
        if Instant::now() < next {
            continue;
        }
        next = Instant::now() + lock.cfg.renew_every();
        if lock.fence.is_some() {
            lock.renew().await;
        } else {
            lock.try_acquire().await;
        }
        lock.reconcile_ip().await;
    }
    lock.shutdown().await;
}

impl Lock {
    fn active(&self) -> bool {
        self.fence.is_some()
    }

    fn set_active(&self, active: bool) {
        self.state.active.store(active, Ordering::Relaxed);
        self.state.metrics.active.set(i64::from(active));
    }

    /// A Lease from the watch. The holder only looks for someone else's name in it (its
    /// own writes carry the resourceVersion it renews from); a standby records it and
    /// returns when the Lease expires, to try then.
    async fn seen(&mut self, lease: Lease) -> Option<Instant> {
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if self.active() {
            if let Some(other) = holder.filter(|h| *h != self.cfg.identity) {
                self.step_down(&format!("the Lease was taken by {other:?}"))
                    .await;
            }
            return None;
        }
        self.observe(lease);
        if holder.is_none() {
            return Some(Instant::now());
        }
        let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(1) as u64);
        let by_record = spec.renew_time.map_or(Duration::ZERO, |t| {
            let age = Timestamp::now().duration_since(t.0).as_secs_f64().max(0.0);
            duration.saturating_sub(Duration::from_secs_f64(age))
        });
        let here = (self.last_change + duration).saturating_duration_since(Instant::now());
        // Just past both expiry rules (see try_acquire).
        Some(Instant::now() + by_record.max(here) + Duration::from_millis(20))
    }

    fn observe(&mut self, lease: Lease) {
        let changed = self.last.as_ref().map(|l| &l.metadata.resource_version)
            != Some(&lease.metadata.resource_version);
        if changed {
            self.last_change = Instant::now();
        }
        self.last = Some(lease);
    }

    async fn bounded<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, Refused> {
        let limit = match self.fence {
            Some(fence) => fence.min(Instant::now() + self.cfg.request_timeout()),
            None => Instant::now() + self.cfg.request_timeout(),
        };
        match tokio::time::timeout_at(limit, f).await {
            Ok(r) => r.map_err(Refused::from),
            Err(_) => Err(Refused::Error(anyhow::anyhow!(
                "{what} got no answer from the apiserver in time"
            ))),
        }
    }

    /// Standby: read the Lease; take it if it is free or expired.
    async fn try_acquire(&mut self) {
        // An agent that cannot serve yet must not keep a serving standby from the Lease.
        if self.state.current_table().is_none() {
            return;
        }
        let name = self.cfg.lease.name.clone();
        let current = match self
            .bounded("reading the Lease", self.api.get_opt(&name))
            .await
        {
            Ok(c) => c,
            Err(Refused::Conflict) => return,
            Err(Refused::Error(e)) => {
                tracing::warn!(lease = %self.cfg.lease, "{e:#}; staying standby");
                return;
            }
        };
        let Some(current) = current else {
            return self.create().await;
        };
        self.observe(current.clone());
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if let Some(holder) = &holder {
            let duration =
                Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(1) as u64);
            let renewed = spec.renew_time.as_ref().map(|t| t.0);
            let expired_by_record = renewed.is_none_or(|t| {
                Timestamp::now().duration_since(t).as_secs_f64() > duration.as_secs_f64()
            });
            // The record's clock is another node's: also wait until we have seen it still
            // for a whole duration on ours (see the module docs).
            let expired_here = self.last_change.elapsed() > duration;
            if !(expired_by_record && expired_here) {
                tracing::trace!(%holder, "Lease held; standby");
                return;
            }
            tracing::info!(previous = %holder, "the Lease expired; taking over");
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        let mut taken = current;
        let now = micro_now();
        taken.spec = Some(LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(self.cfg.duration.as_secs().max(1) as i32),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(if holder.as_deref() == Some(&self.cfg.identity) {
                transitions
            } else {
                transitions.saturating_add(1)
            }),
            ..spec
        });
        // The fence counts from before the write: the standby's clock starts after it.
        let sent = Instant::now();
        let api = self.api.clone();
        match self
            .bounded(
                "taking the Lease",
                api.replace(&name, &PostParams::default(), &taken),
            )
            .await
        {
            Ok(written) => self.became_holder(written, sent).await,
            Err(Refused::Conflict) => {
                tracing::info!("another agent took the Lease first; staying standby")
            }
            Err(Refused::Error(e)) => tracing::warn!("{e:#}; staying standby"),
        }
    }

    async fn create(&mut self) {
        let now = micro_now();
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.cfg.lease.name.clone()),
                namespace: Some(self.cfg.lease.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.cfg.identity.clone()),
                lease_duration_seconds: Some(self.cfg.duration.as_secs().max(1) as i32),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        let sent = Instant::now();
        let api = self.api.clone();
        match self
            .bounded(
                "creating the Lease",
                api.create(&PostParams::default(), &lease),
            )
            .await
        {
            Ok(written) => self.became_holder(written, sent).await,
            Err(Refused::Conflict) => tracing::info!("another agent created the Lease first"),
            Err(Refused::Error(e)) => tracing::warn!(
                lease = %self.cfg.lease,
                "{e:#}; staying standby (the agent needs create/get/update on leases.coordination.k8s.io)"
            ),
        }
    }

    async fn became_holder(&mut self, written: Lease, sent: Instant) {
        self.observe(written);
        self.fence = Some(sent + self.cfg.duration - self.cfg.margin());
        self.state.metrics.takeovers.inc();
        // The IP first, then answers: a client told to renew with us must be able to.
        self.reconcile_ip().await;
        if !self.active() {
            return;
        }
        if let Held::Addr(addr) = self.held {
            self.announce(addr.ip);
        }
        self.set_active(true);
        tracing::info!(
            lease = %self.cfg.lease,
            identity = %self.cfg.identity,
            "holding the Lease: this agent is active"
        );
    }

    /// Holder: renew, bounded by the fence.
    async fn renew(&mut self) {
        let Some(mut lease) = self.last.clone() else {
            return self.step_down("no Lease record to renew").await;
        };
        let renew_time = micro_now();
        if let Some(spec) = lease.spec.as_mut() {
            spec.renew_time = Some(renew_time.clone());
            spec.holder_identity = Some(self.cfg.identity.clone());
        }
        let sent = Instant::now();
        let name = self.cfg.lease.name.clone();
        let api = self.api.clone();
        match self
            .bounded(
                "renewing the Lease",
                api.replace(&name, &PostParams::default(), &lease),
            )
            .await
        {
            Ok(written) => {
                self.observe(written);
                self.fence = Some(sent + self.cfg.duration - self.cfg.margin());
            }
            Err(Refused::Conflict) => {
                // Either someone took it, or our previous write landed and its answer was
                // lost: look.
                let api = self.api.clone();
                match self.bounded("reading the Lease", api.get_opt(&name)).await {
                    Ok(Some(now)) => {
                        let spec = now.spec.clone().unwrap_or_default();
                        if spec.holder_identity.as_deref() == Some(self.cfg.identity.as_str())
                            && spec.renew_time
                                == lease.spec.as_ref().and_then(|s| s.renew_time.clone())
                        {
                            self.observe(now);
                            self.fence = Some(sent + self.cfg.duration - self.cfg.margin());
                        } else {
                            let holder = spec.holder_identity.unwrap_or_default();
                            self.observe(now);
                            self.step_down(&format!("the Lease was taken by {holder:?}"))
                                .await;
                        }
                    }
                    Ok(None) => {
                        self.last = None;
                        self.step_down("the Lease was deleted").await
                    }
                    Err(_) => {
                        self.step_down("the Lease changed under us and cannot be read")
                            .await
                    }
                }
            }
            Err(Refused::Error(e)) => {
                // Not fatal yet: the fence decides.
                tracing::warn!("renewing the Lease: {e:#}; retrying");
            }
        }
    }

    /// Stops answering, then drops the IP — in that order, so no client is told to renew
    /// with an address about to move.
    async fn step_down(&mut self, why: &str) {
        let was_active = self.active();
        self.fence = None;
        self.set_active(false);
        self.reconcile_ip().await;
        if was_active {
            tracing::warn!(lease = %self.cfg.lease, "{why}: this agent is standby now");
        }
        // Our own view of the record no longer counts as a recent change.
        self.last_change = Instant::now();
    }

    /// Makes the interface match the role: the table's server IP while active, none while
    /// standby.
    async fn reconcile_ip(&mut self) {
        let Some(nic) = self.cfg.manage_ip_on.clone() else {
            return;
        };
        let table_addr = wanted_addr(&self.state);
        let wanted = if self.active() { table_addr } else { None };
        if wanted.is_some() && self.held == wanted.map_or(Held::Nothing, Held::Addr) {
            return;
        }
        // What may be on the interface and must go: what we added, or, not knowing, the
        // pool's server IP (a previous run in this pod may have left it behind).
        let stale = match self.held {
            Held::Addr(a) => Some(a.ip),
            Held::Unknown => table_addr.map(|a| a.ip),
            Held::Nothing => None,
        }
        .filter(|ip| wanted.map(|w| w.ip) != Some(*ip));
        if let Some(ip) = stale {
            if let Err(e) = netif::remove(&nic, ip).await {
                // Still unknown: retried at the next tick.
                tracing::error!("{e:#}");
                self.held = Held::Unknown;
                return;
            }
            tracing::info!(%ip, %nic, "server IP not held (removed if it was there)");
            self.held = Held::Nothing;
        } else if self.held == Held::Unknown && table_addr.is_none() {
            // Nothing to check against until the pool is known.
            return;
        }
        let Some(addr) = wanted else {
            self.held = Held::Nothing;
            return;
        };
        if self.held == Held::Addr(addr) {
            return;
        }
        match netif::add(&nic, addr).await {
            Ok(()) => {
                let changed_while_active = matches!(self.held, Held::Addr(_));
                self.held = Held::Addr(addr);
                tracing::info!(%addr, %nic, "server IP configured");
                if changed_while_active {
                    self.announce(addr.ip);
                }
            }
            Err(e) => {
                // An active agent without its address cannot serve renewals: let the Lease
                // move to an agent that can.
                tracing::error!("{e:#}; stepping down");
                self.held = Held::Unknown;
                self.fence = None;
                self.set_active(false);
            }
        }
    }

    fn announce(&self, ip: Ipv4Addr) {
        let Some(nic) = &self.cfg.manage_ip_on else {
            return;
        };
        match netif::gratuitous_arp(nic, ip) {
            Ok(()) => tracing::debug!(%ip, %nic, "gratuitous ARP sent"),
            Err(e) => tracing::warn!("{e:#}; neighbours learn the new MAC when their entries age"),
        }
    }

    /// SIGTERM: let go of everything, then hand the Lease over at once.
    async fn shutdown(&mut self) {
        if !self.active() {
            self.reconcile_ip().await;
            return;
        }
        self.fence = None;
        self.set_active(false);
        self.reconcile_ip().await;
        let Some(mut lease) = self.last.clone() else {
            return;
        };
        if let Some(spec) = lease.spec.as_mut() {
            // An empty holder is free to take now (see try_acquire).
            spec.holder_identity = None;
        }
        let name = self.cfg.lease.name.clone();
        let api = self.api.clone();
        match self
            .bounded(
                "releasing the Lease",
                api.replace(&name, &PostParams::default(), &lease),
            )
            .await
        {
            Ok(_) => tracing::info!(lease = %self.cfg.lease, "Lease released"),
            Err(Refused::Conflict) => {}
            Err(Refused::Error(e)) => {
                tracing::warn!("{e:#}; the standby takes over when the Lease expires instead")
            }
        }
    }
}

/// Parses the lease lock flags into a config.
pub fn config(
    lease: &str,
    identity: &str,
    duration_seconds: u64,
    manage_ip_on: Option<String>,
) -> anyhow::Result<LockConfig> {
    let lease = super::cluster::parse_ref("--lease-lock", lease)?;
    if duration_seconds < 2 {
        anyhow::bail!(
            "--lease-duration-seconds {duration_seconds}: at least 2 (renewals run every third of it)"
        );
    }
    let duration = Duration::from_secs(duration_seconds);
    i32::try_from(duration_seconds).context("--lease-duration-seconds is too large")?;
    Ok(LockConfig {
        lease,
        identity: identity.to_string(),
        duration,
        manage_ip_on,
    })
}
