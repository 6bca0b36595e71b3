//! The address objects of the store as per-pool holdings (`vm_dhcp_core::store::Holdings`),
//! kept by a watch. Shared by the webhook (allocation) and the controller (projection,
//! releases, vmnetcfg status).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use futures::StreamExt as _;
use kube::api::Api;
use kube::runtime::{WatchStreamExt as _, watcher};
use vm_dhcp_core::crd::IPPoolAddress;
use vm_dhcp_core::store::{Holdings, PoolKey};

/// The holdings, and whether the first complete list has arrived.
#[derive(Clone)]
pub struct WatchedHoldings {
    pub holdings: Arc<Mutex<Holdings>>,
    synced: tokio::sync::watch::Receiver<bool>,
}

impl WatchedHoldings {
    /// Waits until the first complete list has been applied (false if the watch ended).
    pub async fn wait_until_synced(&mut self) -> bool {
        loop {
            if *self.synced.borrow_and_update() {
                return true;
            }
            if self.synced.changed().await.is_err() {
                return false;
            }
        }
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Holdings> {
        self.holdings.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Starts the watch; `changed` is told of every address object applied or deleted after the
/// first list (its pool and address), and of each pool in a relist (address `None`).
pub fn watch_holdings(
    api: Api<IPPoolAddress>,
    config: watcher::Config,
    changed: impl Fn(&PoolKey, Option<IpAddr>) + Send + 'static,
) -> WatchedHoldings {
    let holdings = Arc::new(Mutex::new(Holdings::default()));
    let (synced_tx, synced) = tokio::sync::watch::channel(false);
    let shared = holdings.clone();
    let stream = watcher(api, config).default_backoff();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    tracing::warn!(error = %e, "IPPoolAddress watch failed; retrying");
                    continue;
                }
            };
            let mut h = shared.lock().unwrap_or_else(|e| e.into_inner());
            let ip = |obj: &IPPoolAddress| obj.spec.address.trim().parse::<IpAddr>().ok();
            let outcome = match &event {
                watcher::Event::Apply(obj) => h.apply(obj).map(|key| vec![(key, ip(obj))]),
                watcher::Event::Delete(obj) => Ok(h
                    .delete(obj)
                    .map(|key| (key, ip(obj)))
                    .into_iter()
                    .collect()),
                watcher::Event::Init => {
                    h.restart();
                    Ok(Vec::new())
                }
                watcher::Event::InitApply(obj) => h.restart_apply(obj).map(|()| Vec::new()),
                watcher::Event::InitDone => {
                    h.restart_done();
                    let _ = synced_tx.send(true);
                    Ok(h.pools().map(|k| (k.clone(), None)).collect())
                }
            };
            drop(h);
            match outcome {
                Ok(keys) => {
                    for (key, ip) in keys {
                        changed(&key, ip);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "address object ignored"),
            }
        }
    });
    WatchedHoldings { holdings, synced }
}
