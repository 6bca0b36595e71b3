//! One coordination.k8s.io Lease runner for the controller's leader election and the
//! agents' activation. The rules are `vm_dhcp_core::lease` (our own monotonic clock only,
//! never the other node's `renewTime`); this module reads, watches and writes.
//!
//! - Every request is bounded by the elector's request timeout and never outlives the fence.
//! - The fence is a timer of its own in the loop: a request that hangs (an apiserver that
//!   stops answering) cannot keep this process holding past it.
//! - The watch of the Lease is restarted when it ends; polling carries on meanwhile. Nothing
//!   in the loop waits without a bound.
//!
//! The role is published on a `watch` channel: `Role::Holder { until }` carries the fence,
//! which writers use to bound their own requests. Stepping down publishes `Role::Standby`
//! at once; what the holder must undo (an agent's server IP) is the subscriber's business,
//! with `margin` as its time to do it.

use std::time::Duration;

use anyhow::anyhow;
use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use kube::runtime::WatchStreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use vm_dhcp_core::lease::{Elector, Next, Record};

/// This process's part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Standby,
    /// Holding the Lease until `until` unless a renewal moves it on.
    Holder {
        until: Instant,
    },
}

impl Role {
    pub fn is_holder(&self) -> bool {
        matches!(self, Role::Holder { until } if Instant::now() < *until)
    }

    /// The fence while holding.
    pub fn until(&self) -> Option<Instant> {
        match self {
            Role::Holder { until } => Some(*until),
            Role::Standby => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
}

impl std::fmt::Display for LeaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a write did not make (or keep) us the holder.
enum Refused {
    /// 409: someone wrote the Lease first.
    Conflict,
    Error(anyhow::Error),
}

fn refused(e: kube::Error) -> Refused {
    match &e {
        kube::Error::Api(s) if s.code == 409 => Refused::Conflict,
        _ => Refused::Error(e.into()),
    }
}

fn record_of(lease: &Lease) -> Record {
    let spec = lease.spec.clone().unwrap_or_default();
    Record {
        version: lease.metadata.resource_version.clone().unwrap_or_default(),
        holder: spec.holder_identity.filter(|h| !h.is_empty()),
        duration: Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(1) as u64),
    }
}

struct Runner {
    api: Api<Lease>,
    cfg: LeaseConfig,
    elector: Elector,
    /// The Lease as last read or written (what the next write starts from).
    last: Option<Lease>,
    origin: Instant,
    role: watch::Sender<Role>,
}

/// Runs the Lease for `cfg.identity` until `stop` turns true (or its sender is dropped).
/// While `eligible` is false this candidate does not compete, and a holder releases.
/// On stop a holder steps down first, then writes an empty holder so a standby takes over
/// at once (`release_on_stop`; an agent that must first drop its IP passes false and calls
/// [`release`] itself).
pub async fn run(
    api: Api<Lease>,
    cfg: LeaseConfig,
    mut eligible: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    role: watch::Sender<Role>,
    release_on_stop: bool,
) -> Option<Lease> {
    let mut r = Runner {
        elector: Elector::new(cfg.identity.clone(), cfg.duration),
        api,
        cfg,
        last: None,
        origin: Instant::now(),
        role,
    };
    r.publish();
    let mut events = r.watch_stream();
    let mut next = Instant::now();
    let mut watch_retry: Option<Instant> = None;
    loop {
        let fence = r.elector.fence().map(|f| r.origin + f);
        let wake = fence.map_or(next, |f| next.min(f));
        let wake = watch_retry.map_or(wake, |w| wake.min(w));
        tokio::select! {
            biased;
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
                continue;
            }
            _ = tokio::time::sleep_until(wake) => {}
            event = events.next(), if watch_retry.is_none() => {
                match event {
                    Some(Ok(lease)) => r.seen(lease),
                    Some(Err(e)) => tracing::debug!(lease = %r.cfg, "watching the Lease: {e}; polling meanwhile"),
                    None => {
                        // Polling carries on; the watch is started again shortly.
                        tracing::debug!(lease = %r.cfg, "the Lease watch ended; restarting it");
                        watch_retry = Some(Instant::now() + Duration::from_secs(1));
                    }
                }
                let can = *eligible.borrow();
                if let Next::Wait { until, .. } = r.elector.next(r.now(), can) {
                    // Just past the expiry seen here.
                    next = next.min(r.origin + until + Duration::from_millis(20));
                }
                if r.elector.fence().is_some() && !r.elector.holding(r.now()) {
                    r.step_down("the Lease could not be renewed in time");
                }
                continue;
            }
            changed = eligible.changed() => {
                if changed.is_err() {
                    break;
                }
                let can = *eligible.borrow();
                if can {
                    next = Instant::now();
                } else if r.elector.fence().is_some() {
                    r.step_down("this candidate can no longer serve");
                    r.release().await;
                }
                continue;
            }
        }
        if watch_retry.is_some_and(|w| Instant::now() >= w) {
            watch_retry = None;
            events = r.watch_stream();
        }
        if r.elector.fence().is_some() && !r.elector.holding(r.now()) {
            r.step_down("the Lease could not be renewed in time");
        }
        if Instant::now() < next {
            continue;
        }
        next = Instant::now() + r.elector.renew_every();
        let can = *eligible.borrow();
        r.step(can).await;
    }
    let held = r.elector.fence().is_some();
    r.step_down("stopping");
    if held && release_on_stop {
        r.release().await;
    }
    r.last.filter(|_| held)
}

/// Writes an empty holder into `lease` (as last written by us), so that a standby takes
/// over at once instead of waiting for it to expire. Bounded to 2 s.
pub async fn release(api: &Api<Lease>, mut lease: Lease, identity: &str) {
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(identity) {
        return;
    }
    spec.holder_identity = None;
    let name = lease.metadata.name.clone().unwrap_or_default();
    let params = PostParams::default();
    let write = api.replace(&name, &params, &lease);
    match tokio::time::timeout(Duration::from_secs(2), write).await {
        Ok(Ok(_)) => tracing::info!(lease = %name, "Lease released"),
        Ok(Err(e)) => {
            tracing::info!(lease = %name, "not released ({e}); a standby takes over when it expires")
        }
        Err(_) => tracing::info!(
            lease = %name,
            "not released (no answer in 2 s); a standby takes over when it expires"
        ),
    }
}

impl Runner {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn publish(&self) {
        let role = match self.elector.fence() {
            Some(f) if self.elector.holding(self.now()) => Role::Holder {
                until: self.origin + f,
            },
            _ => Role::Standby,
        };
        self.role.send_if_modified(|r| {
            let changed = *r != role;
            *r = role;
            changed
        });
    }

    fn watch_stream(
        &self,
    ) -> std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Lease, String>> + Send>> {
        let stream = kube::runtime::watcher::watch_object(self.api.clone(), &self.cfg.name)
            .default_backoff()
            .filter_map(|e| async move {
                match e {
                    Ok(Some(lease)) => Some(Ok(lease)),
                    // Deleted: the next read sees it.
                    Ok(None) => None,
                    Err(e) => Some(Err(e.to_string())),
                }
            });
        Box::pin(stream)
    }

    /// A Lease from the watch.
    fn seen(&mut self, lease: Lease) {
        let record = record_of(&lease);
        if self.elector.fence().is_some() {
            // Our own writes come back too; only someone else's name matters.
            if let Some(other) = self.elector.taken_by(Some(&record)) {
                self.last = Some(lease);
                self.elector.observe(Some(record), self.now());
                self.step_down(&format!("the Lease was taken by {other:?}"));
            }
            return;
        }
        self.elector.observe(Some(record), self.now());
        self.last = Some(lease);
    }

    /// A request bounded by the request timeout and by the fence.
    async fn bounded<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, Refused> {
        let mut limit = Instant::now() + self.elector.request_timeout();
        if let Some(f) = self.elector.fence() {
            limit = limit.min(self.origin + f);
        }
        match tokio::time::timeout_at(limit, f).await {
            Ok(r) => r.map_err(refused),
            Err(_) => Err(Refused::Error(anyhow!(
                "{what}: no answer from the apiserver in time"
            ))),
        }
    }

    async fn read(&mut self) -> bool {
        let api = self.api.clone();
        match self
            .bounded("reading the Lease", api.get_opt(&self.cfg.name))
            .await
        {
            Ok(lease) => {
                self.elector
                    .observe(lease.as_ref().map(record_of), self.now());
                self.last = lease;
                true
            }
            Err(Refused::Conflict) => false,
            Err(Refused::Error(e)) => {
                tracing::warn!(lease = %self.cfg, "{e:#}");
                false
            }
        }
    }

    async fn step(&mut self, eligible: bool) {
        let now = self.now();
        match self.elector.next(now, eligible) {
            Next::Renew => self.write(false).await,
            Next::Idle => {}
            Next::Create | Next::Take | Next::Wait { .. } => {
                // Decide on a fresh read, not on what the watch may have missed.
                if !self.read().await {
                    return;
                }
                match self.elector.next(self.now(), eligible) {
                    Next::Create => self.create().await,
                    Next::Take => {
                        if let Some(holder) = self.elector.seen().and_then(|r| r.holder.clone())
                            && holder != self.cfg.identity
                        {
                            tracing::info!(lease = %self.cfg, previous = %holder, "the Lease expired; taking over");
                        }
                        self.write(true).await
                    }
                    _ => {}
                }
            }
        }
    }

    fn spec(&self, taking: bool) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        let old = self
            .last
            .as_ref()
            .and_then(|l| l.spec.clone())
            .unwrap_or_default();
        let ours = old.holder_identity.as_deref() == Some(self.cfg.identity.as_str());
        let transitions = old.lease_transitions.unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(self.elector.duration().as_secs().max(1) as i32),
            acquire_time: if taking && !ours {
                Some(now.clone())
            } else {
                old.acquire_time.clone()
            },
            renew_time: Some(now),
            lease_transitions: Some(if taking && !ours {
                transitions.saturating_add(1)
            } else {
                transitions
            }),
            ..old
        }
    }

    async fn create(&mut self) {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.cfg.name.clone()),
                namespace: Some(self.cfg.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                lease_transitions: Some(0),
                ..self.spec(true)
            }),
        };
        let sent = self.now();
        let api = self.api.clone();
        match self
            .bounded(
                "creating the Lease",
                api.create(&PostParams::default(), &lease),
            )
            .await
        {
            Ok(written) => self.won(written, sent),
            Err(Refused::Conflict) => {
                tracing::info!(lease = %self.cfg, "another candidate created the Lease first")
            }
            Err(Refused::Error(e)) => tracing::warn!(
                lease = %self.cfg,
                "{e:#}; standing by (this needs create/get/update on leases.coordination.k8s.io)"
            ),
        }
    }

    /// Take over (`taking`) or renew, with the resourceVersion last seen.
    async fn write(&mut self, taking: bool) {
        let Some(mut lease) = self.last.clone() else {
            if !taking {
                self.step_down("no Lease record to renew");
            }
            return;
        };
        lease.spec = Some(self.spec(taking));
        let sent = self.now();
        let api = self.api.clone();
        let what = if taking {
            "taking the Lease"
        } else {
            "renewing the Lease"
        };
        match self
            .bounded(
                what,
                api.replace(&self.cfg.name, &PostParams::default(), &lease),
            )
            .await
        {
            Ok(written) => self.won(written, sent),
            Err(Refused::Conflict) if taking => {
                tracing::info!(lease = %self.cfg, "another candidate took the Lease first; standing by")
            }
            Err(Refused::Conflict) => {
                // Someone took it, or our previous write landed and its answer was lost:
                // look (a renewal with our renewTime is ours).
                let ours = lease.spec.as_ref().and_then(|s| s.renew_time.clone());
                if !self.read().await {
                    return self.step_down("the Lease changed under us and cannot be read");
                }
                let now = self.last.as_ref().and_then(|l| l.spec.clone());
                let still_ours = now.as_ref().is_some_and(|s| {
                    s.holder_identity.as_deref() == Some(self.cfg.identity.as_str())
                        && s.renew_time == ours
                });
                if still_ours && let Some(l) = self.last.clone() {
                    self.won(l, sent);
                } else {
                    let holder = now.and_then(|s| s.holder_identity).unwrap_or_default();
                    self.step_down(&format!("the Lease was taken by {holder:?}"));
                }
            }
            // Not fatal yet: the fence decides.
            Err(Refused::Error(e)) => tracing::warn!(lease = %self.cfg, "{e:#}; retrying"),
        }
    }

    fn won(&mut self, written: Lease, sent: Duration) {
        let was = self.elector.fence().is_some();
        self.elector.won(record_of(&written), sent, self.now());
        self.last = Some(written);
        if !self.elector.holding(self.now()) {
            // The answer came after the fence it set: as good as lost.
            return self.step_down("the Lease write was answered too late");
        }
        if !was {
            tracing::info!(lease = %self.cfg, identity = %self.cfg.identity, "holding the Lease");
        }
        self.publish();
    }

    fn step_down(&mut self, why: &str) {
        let was = self.elector.fence().is_some();
        self.elector.step_down(self.now());
        self.publish();
        if was {
            tracing::warn!(lease = %self.cfg, "{why}: standing by");
        }
    }

    async fn release(&mut self) {
        if let Some(lease) = self.last.clone() {
            release(&self.api, lease, &self.cfg.identity).await;
        }
    }
}
