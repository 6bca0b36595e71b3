//! Where lease tables come from: whole snapshots in, tables out.
//!
//! A source publishes the latest [`Snapshot`] on a watch channel (which keeps only the
//! latest, so a burst of changes costs one build): offline, [`watch_file`] sends the IPPool
//! manifest, whose `status.ipv4.allocated` lists the leases; in the cluster,
//! [`super::cluster::watch_cluster`] sends the IPPool (for its spec) with the allocations
//! its `IPPoolAddress` objects hold. [`build_tables`] turns every snapshot into a fresh
//! table — never a patch — and rebuilds periodically, re-resolving NTP host names.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;
use vm_dhcp_core::MacAddr;
use vm_dhcp_core::crd::IPPool;
use vm_dhcp_core::dhcp::{LeaseTable, TableError, ntp_names};

use super::{AgentState, stopped};

/// One whole input of the table.
#[derive(Debug, Clone)]
pub enum Snapshot {
    /// Offline: an IPPool manifest whose `status.ipv4.allocated` lists the leases.
    Manifest(Box<IPPool>),
    /// Cluster: the IPPool (only its spec and name count) and the allocations of its
    /// `IPPoolAddress` objects, in address order; the pool's status is not read.
    Objects {
        pool: Arc<IPPool>,
        allocations: Vec<(IpAddr, MacAddr)>,
    },
}

impl Snapshot {
    pub fn pool(&self) -> &IPPool {
        match self {
            Snapshot::Manifest(pool) => pool,
            Snapshot::Objects { pool, .. } => pool,
        }
    }

    pub fn table(&self, ntp: &BTreeMap<String, Vec<Ipv4Addr>>) -> Result<LeaseTable, TableError> {
        match self {
            Snapshot::Manifest(pool) => LeaseTable::from_pool(pool, ntp),
            Snapshot::Objects { pool, allocations } => {
                LeaseTable::from_allocations(pool, allocations.iter().copied(), ntp)
            }
        }
    }
}

pub type PoolSnapshot = Option<Arc<Snapshot>>;

/// How often the pool file is checked for a change.
const FILE_POLL: Duration = Duration::from_secs(1);

/// What identifies one version of the file (an editor that replaces the file changes the
/// inode; one that writes in place changes mtime or size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileVersion {
    inode: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

pub fn load_pool_file(path: &Path) -> anyhow::Result<IPPool> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading pool file {}", path.display()))?;
    let what = || {
        format!(
            "pool file {} is not a valid IPPool manifest (apiVersion network.harvesterhci.io/v1alpha1, kind IPPool, spec.ipv4Config, status.ipv4.allocated)",
            path.display()
        )
    };
    let value: serde_yaml::Value = serde_yaml::from_str(&text).with_context(what)?;
    if let Some(kind) = value.get("kind").and_then(serde_yaml::Value::as_str)
        && kind != "IPPool"
    {
        anyhow::bail!("{}: it holds a {kind}", what());
    }
    serde_yaml::from_value::<IPPool>(value).with_context(what)
}

/// Offline source: the IPPool in a YAML file, reloaded when the file changes. A file that
/// does not parse keeps the previous pool in force (and says so).
pub async fn watch_file(
    path: PathBuf,
    tx: watch::Sender<PoolSnapshot>,
    state: Arc<AgentState>,
    stop: watch::Receiver<bool>,
) {
    let mut seen: Option<FileVersion> = None;
    let mut missing_reported = false;
    let mut tick = tokio::time::interval(FILE_POLL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let stop = stopped(stop);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        let version = match std::fs::metadata(&path) {
            Ok(m) => FileVersion {
                inode: m.ino(),
                len: m.len(),
                mtime: m.mtime(),
                mtime_nsec: m.mtime_nsec(),
            },
            Err(e) => {
                if !missing_reported {
                    tracing::error!(
                        "pool file {}: {e}; {}",
                        path.display(),
                        if tx.borrow().is_some() {
                            "keeping the previous lease table"
                        } else {
                            "nothing to serve until it exists"
                        }
                    );
                    missing_reported = true;
                }
                continue;
            }
        };
        missing_reported = false;
        if seen == Some(version) {
            continue;
        }
        seen = Some(version);
        match load_pool_file(&path) {
            Ok(pool) => {
                tracing::debug!(file = %path.display(), "pool file read");
                tx.send_replace(Some(Arc::new(Snapshot::Manifest(Box::new(pool)))));
            }
            Err(e) => {
                state.metrics.reload("invalid_source");
                tracing::error!(
                    "{e:#}; {}",
                    if tx.borrow().is_some() {
                        "keeping the previous lease table until the file is fixed"
                    } else {
                        "nothing to serve until the file is fixed"
                    }
                )
            }
        }
    }
}

/// Resolves NTP host names to IPv4 addresses (blocking: getaddrinfo).
fn resolve(names: &[String]) -> BTreeMap<String, Vec<Ipv4Addr>> {
    names
        .iter()
        .map(|name| {
            let addrs = match (name.as_str(), 123).to_socket_addrs() {
                Ok(addrs) => {
                    let mut v4: Vec<Ipv4Addr> = addrs
                        .filter_map(|a| match a {
                            SocketAddr::V4(a) => Some(*a.ip()),
                            SocketAddr::V6(_) => None,
                        })
                        .collect();
                    v4.sort();
                    v4.dedup();
                    v4
                }
                Err(e) => {
                    tracing::warn!("cannot resolve NTP server {name:?}: {e}");
                    Vec::new()
                }
            };
            (name.clone(), addrs)
        })
        .collect()
}

/// CPU time (user + system) this process has used, in milliseconds: with `since_start_ms`
/// it tells the agent's own share of a rebuild from the time spent waiting on the API.
fn process_cpu_ms() -> f64 {
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF has no preconditions.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return f64::NAN;
        }
        usage
    };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    ms(usage.ru_utime) + ms(usage.ru_stime)
}

/// Builds the table from the snapshot and publishes it if it differs from the one in force.
fn rebuild(state: &AgentState, snapshot: &Snapshot, ntp: &BTreeMap<String, Vec<Ipv4Addr>>) {
    let started = std::time::Instant::now();
    match snapshot.table(ntp) {
        Ok(table) => {
            let unchanged = state
                .current_table()
                .is_some_and(|current| *current == table);
            state
                .metrics
                .reload(if unchanged { "unchanged" } else { "ok" });
            if unchanged {
                return;
            }
            for issue in table.issues() {
                tracing::warn!(pool = table.pool(), "{issue}");
            }
            tracing::info!(
                pool = table.pool(),
                leases = table.len(),
                server = %table.options().server_ip,
                lease_time = table.options().lease_time,
                build_ms = started.elapsed().as_secs_f64() * 1e3,
                since_start_ms = state.started.elapsed().as_secs_f64() * 1e3,
                cpu_ms = process_cpu_ms(),
                "lease table loaded"
            );
            state.book().retain_table(&table);
            state.metrics.leases.set(table.len() as i64);
            state.table.send_replace(Some(Arc::new(table)));
        }
        Err(e) => {
            state.metrics.reload("error");
            tracing::error!(
                "{e}; {}",
                if state.current_table().is_some() {
                    "keeping the previous lease table"
                } else {
                    "nothing to serve yet"
                }
            );
        }
    }
}

pub async fn build_tables(
    mut pools: watch::Receiver<PoolSnapshot>,
    state: Arc<AgentState>,
    resync: Duration,
    stop: watch::Receiver<bool>,
) {
    let mut ntp: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    let (resolved_tx, mut resolved_rx) = mpsc::channel::<BTreeMap<String, Vec<Ipv4Addr>>>(1);
    let mut resolving = false;
    // Resolution runs beside the table: a slow or absent DNS never delays serving.
    let start_resolving = |names: Vec<String>, resolving: &mut bool| {
        if names.is_empty() || *resolving {
            return;
        }
        *resolving = true;
        let tx = resolved_tx.clone();
        tokio::task::spawn_blocking(move || {
            let _ = tx.blocking_send(resolve(&names));
        });
    };
    let mut resync_tick = tokio::time::interval_at(tokio::time::Instant::now() + resync, resync);
    resync_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let stop = stopped(stop);
    tokio::pin!(stop);
    loop {
        let refresh_all = tokio::select! {
            _ = &mut stop => return,
            changed = pools.changed() => {
                if changed.is_err() {
                    return;
                }
                false
            }
            _ = resync_tick.tick() => true,
            Some(fresh) = resolved_rx.recv() => {
                resolving = false;
                for (name, addrs) in fresh {
                    // A failed re-resolution keeps the last known addresses.
                    if !addrs.is_empty() {
                        ntp.insert(name, addrs);
                    }
                }
                false
            }
        };
        let Some(snapshot) = pools.borrow_and_update().clone() else {
            continue;
        };
        rebuild(&state, &snapshot, &ntp);
        let names = ntp_names(snapshot.pool());
        let wanted: Vec<String> = if refresh_all {
            names
        } else {
            names.into_iter().filter(|n| !ntp.contains_key(n)).collect()
        };
        start_resolving(wanted, &mut resolving);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_localhost_without_the_network() {
        let resolved = resolve(&["localhost".to_string()]);
        assert_eq!(
            resolved.get("localhost").map(Vec::as_slice),
            Some(&[Ipv4Addr::LOCALHOST][..])
        );
    }

    #[test]
    fn bad_file_says_what_and_where() {
        let dir = std::env::temp_dir().join(format!("vm-dhcp-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("pool.yaml");
        std::fs::write(&path, "spec: [not, a, pool]\n").expect("write");
        let err = format!("{:#}", load_pool_file(&path).expect_err("not a pool"));
        assert!(err.contains("pool.yaml"), "{err}");
        assert!(err.contains("not a valid IPPool"), "{err}");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
        )
        .expect("write");
        let err = format!("{:#}", load_pool_file(&path).expect_err("a ConfigMap"));
        assert!(err.contains("it holds a ConfigMap"), "{err}");
        let err = format!(
            "{:#}",
            load_pool_file(&dir.join("absent.yaml")).expect_err("absent")
        );
        assert!(err.contains("absent.yaml"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
