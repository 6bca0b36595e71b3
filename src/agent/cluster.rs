//! Cluster mode: the IPPool named by `--ippool-ref`, watched through the API.
//!
//! Every event carries the whole object, which goes into the same snapshot channel the
//! offline file feeds; a periodic GET re-reads it as well, so a watch that silently stalls
//! cannot leave the table behind the pool for longer than one resync period.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use futures_util::StreamExt;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use vm_dhcp_core::crd::IPPool;

use super::source::PoolSnapshot;
use super::{AgentState, stopped};

/// `<namespace>/<name>`, as `--ippool-ref`, `--lease-lock` and upstream's IPPOOL_REF spell it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

pub fn parse_ref(flag: &str, value: &str) -> anyhow::Result<ObjectRef> {
    match value.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(ObjectRef {
                namespace: ns.to_string(),
                name: name.to_string(),
            })
        }
        _ => bail!("{flag} {value:?}: expected <namespace>/<name>, e.g. default/net-48"),
    }
}

/// Feeds `tx` with the pool on every change and every `resync`, until `stop`.
pub async fn watch_pool(
    api: Api<IPPool>,
    pool: ObjectRef,
    tx: watch::Sender<PoolSnapshot>,
    state: Arc<AgentState>,
    resync: Duration,
    stop: watch::Receiver<bool>,
) {
    let events = watcher::watch_object(api.clone(), &pool.name).default_backoff();
    tokio::pin!(events);
    let mut resync_tick = tokio::time::interval_at(tokio::time::Instant::now() + resync, resync);
    resync_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let stop = stopped(stop);
    tokio::pin!(stop);
    // Errors repeat while the apiserver is away: say so once per outage, not per retry.
    let mut failing = false;
    loop {
        let seen = tokio::select! {
            _ = &mut stop => return,
            event = events.next() => match event {
                None => {
                    tracing::error!("the IPPool watch ended; keeping the current table");
                    return;
                }
                Some(Ok(seen)) => seen,
                Some(Err(e)) => {
                    if !failing {
                        tracing::warn!(ippool = %pool, "watching the IPPool: {e}; retrying with backoff, the current table stays in force");
                        failing = true;
                    }
                    continue;
                }
            },
            _ = resync_tick.tick() => match api.get_opt(&pool.name).await {
                Ok(seen) => seen,
                Err(e) => {
                    tracing::warn!(ippool = %pool, "resync: reading the IPPool: {e}; the current table stays in force");
                    continue;
                }
            },
        };
        if failing {
            tracing::info!(ippool = %pool, "IPPool watch restored");
            failing = false;
        }
        match seen {
            Some(p) => {
                tx.send_replace(Some(Arc::new(p)));
            }
            None => {
                // A missing pool may be a typo in --ippool-ref, an RBAC rule that hides it,
                // or a deletion in progress; the controller removes agents of deleted pools.
                state.metrics.reload("pool_missing");
                tracing::warn!(
                    ippool = %pool,
                    "the IPPool does not exist (check --ippool-ref); {}",
                    if tx.borrow().is_some() {
                        "keeping the previous lease table"
                    } else {
                        "nothing to serve until it exists"
                    }
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_need_namespace_and_name() {
        assert_eq!(
            parse_ref("--ippool-ref", "default/net-48").expect("valid"),
            ObjectRef {
                namespace: "default".into(),
                name: "net-48".into()
            }
        );
        for bad in ["net-48", "/net-48", "default/", "a/b/c", ""] {
            let err = parse_ref("--ippool-ref", bad).expect_err(bad).to_string();
            assert!(err.contains("<namespace>/<name>"), "{err}");
        }
    }
}
