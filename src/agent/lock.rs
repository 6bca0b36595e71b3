//! Active/standby: only the holder of one coordination.k8s.io/v1 Lease answers DHCP and,
//! with `--manage-server-ip`, holds the pool's server IP.
//!
//! Who holds the Lease is decided by the one Lease runner (`crate::lease`, rules in
//! `vm_dhcp_core::lease`): a standby takes over only after it has seen the record unchanged
//! for a whole lease duration on its own clock, while the holder lets go once
//! `duration − margin` has passed since it sent its last successful renewal. This module
//! applies the role: the IP first, then answers, when it becomes active; answers off, then
//! the IP, when it stops — within the margin, and on its own copy of the fence even if the
//! runner's update is late.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::lease::{self, LeaseConfig, Role};

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

/// The agent's side of the Lease: the role the Lease runner publishes, applied to the
/// interface and to answering.
struct Lock {
    cfg: LockConfig,
    state: Arc<AgentState>,
    held: Held,
    /// Whether we answer (and hold the IP): follows the runner's role.
    active: bool,
}

pub async fn run(
    api: Api<Lease>,
    cfg: LockConfig,
    state: Arc<AgentState>,
    stop: watch::Receiver<bool>,
) {
    let lease_cfg = LeaseConfig {
        namespace: cfg.lease.namespace.clone(),
        name: cfg.lease.name.clone(),
        identity: cfg.identity.clone(),
        duration: cfg.duration,
    };
    let (role_tx, mut role) = watch::channel(Role::Standby);
    // An agent that cannot serve yet must not keep a serving standby from the Lease.
    let (eligible_tx, eligible_rx) = watch::channel(state.current_table().is_some());
    let (runner_stop_tx, runner_stop_rx) = watch::channel(false);
    // The runner does not release on stop: the IP goes first (below), then the Lease.
    let runner = tokio::spawn(lease::run(
        api.clone(),
        lease_cfg,
        eligible_rx,
        runner_stop_rx,
        role_tx,
        false,
    ));
    let mut lock = Lock {
        cfg,
        state,
        held: Held::Unknown,
        active: false,
    };
    lock.set_active(false);
    lock.reconcile_ip().await;
    let mut tables = lock.state.table.subscribe();
    let stop = stopped(stop);
    tokio::pin!(stop);
    // After an IP failure: not eligible until then.
    let mut retry: Option<Instant> = None;
    loop {
        let current = *role.borrow_and_update();
        // Our own copy of the fence: the role is dropped locally when it passes, even if
        // the runner's update has not arrived.
        let fence = current.until().filter(|_| lock.active);
        tokio::select! {
            biased;
            _ = &mut stop => break,
            _ = sleep_until_some(fence) => {
                lock.deactivate("the Lease could not be renewed in time").await;
            }
            changed = role.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = *role.borrow();
                if now.is_holder() && !lock.active {
                    if !lock.activate().await {
                        eligible_tx.send_replace(false);
                        retry = Some(Instant::now() + lock.cfg.duration);
                    }
                } else if !now.is_holder() && lock.active {
                    lock.deactivate("the Lease moved or was not renewed").await;
                }
            }
            _ = sleep_until_some(retry) => {
                retry = None;
                eligible_tx.send_replace(lock.state.current_table().is_some());
            }
            // A new server IP in the pool is applied at once.
            changed = tables.changed() => {
                if changed.is_err() {
                    break;
                }
                if retry.is_none() {
                    eligible_tx.send_replace(lock.state.current_table().is_some());
                }
                lock.reconcile_ip().await;
            }
        }
    }
    // SIGTERM: stop answering and drop the IP, then hand the Lease over at once.
    let was_active = lock.active;
    lock.deactivate("stopping").await;
    let _ = runner_stop_tx.send(true);
    let last = runner.await.ok().flatten();
    if let (true, Some(lease)) = (was_active, last) {
        lease::release(&api, lease, &lock.cfg.identity).await;
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Lock {
    fn set_active(&mut self, active: bool) {
        self.active = active;
        self.state.active.store(active, Ordering::Relaxed);
        self.state.metrics.active.set(i64::from(active));
    }

    /// The runner says we hold the Lease: the IP first, then answers (a client told to
    /// renew with us must be able to). False when the IP cannot be configured.
    async fn activate(&mut self) -> bool {
        self.active = true;
        self.reconcile_ip().await;
        if !self.active {
            // reconcile_ip stepped down: the IP could not be added.
            return false;
        }
        if let Held::Addr(addr) = self.held {
            self.announce(addr.ip);
        }
        self.set_active(true);
        self.state.metrics.takeovers.inc();
        tracing::info!(
            lease = %self.cfg.lease,
            identity = %self.cfg.identity,
            "holding the Lease: this agent is active"
        );
        true
    }

    /// Stops answering, then drops the IP — in that order, so no client is told to renew
    /// with an address about to move.
    async fn deactivate(&mut self, why: &str) {
        let was_active = self.active;
        self.set_active(false);
        self.reconcile_ip().await;
        if was_active {
            tracing::warn!(lease = %self.cfg.lease, "{why}: this agent is standby now");
        }
    }

    /// Makes the interface match the role: the table's server IP while active, none while
    /// standby.
    async fn reconcile_ip(&mut self) {
        let Some(nic) = self.cfg.manage_ip_on.clone() else {
            return;
        };
        let table_addr = wanted_addr(&self.state);
        let wanted = if self.active { table_addr } else { None };
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
