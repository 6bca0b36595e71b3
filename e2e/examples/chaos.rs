//! The fault-injection suite (`make chaos`, root, not CI): the whole product on the local
//! control plane with load running, every fault in turn (see `vm_dhcp_e2e::chaos`); prints
//! the table and exits non-zero if an invariant was violated.
//!
//! `CHAOS_FAULTS` picks faults by short name, comma-separated (`webhook`, `controller`,
//! `agent`, `apiserver`, `kube-apiserver`, `etcd`, `partition`, `node`, `nospace`; default:
//! all); `CHAOS_RATE` VM creates per second (default 2), `CHAOS_LIVE` VMs kept alive by the
//! load (default 40), `CHAOS_GUESTS` renewing DHCP clients (default 3), `CHAOS_SETTLE`
//! seconds of load before each fault and after its recovery (default 10).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use vm_dhcp_e2e::chaos::{self, Config, Fault};

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> Result<T> {
    match std::env::var(key) {
        Ok(v) => v
            .parse()
            .ok()
            .with_context(|| format!("{key}={v} is not a valid value")),
        Err(_) => Ok(default),
    }
}

fn faults() -> Result<Vec<Fault>> {
    let Ok(list) = std::env::var("CHAOS_FAULTS") else {
        return Ok(Fault::ALL.to_vec());
    };
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| Fault::parse(s).with_context(|| format!("CHAOS_FAULTS: no fault named {s}")))
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the chaos suite needs root: it makes network namespaces for nodes and guests");
    }
    let cfg = Config {
        rate: env_or("CHAOS_RATE", 2.0)?,
        live: env_or("CHAOS_LIVE", 40)?,
        guests: env_or("CHAOS_GUESTS", 3)?,
        settle: Duration::from_secs(env_or("CHAOS_SETTLE", 10)?),
        faults: faults()?,
    };
    eprintln!(
        "chaos: {cfg:?}; logs in {}",
        vm_dhcp_e2e::proc::run_dir()?.display()
    );
    let t0 = Instant::now();
    let rows = chaos::run(cfg).await?;
    println!("{}", chaos::table(&rows));
    println!(
        "{} fault(s) in {:.0} s",
        rows.len(),
        t0.elapsed().as_secs_f64()
    );
    for r in rows.iter().filter(|r| !r.ok()) {
        eprintln!("{}:\n  {}", r.fault.name(), r.violations.join("\n  "));
    }
    let bad = rows.iter().filter(|r| !r.ok()).count();
    if bad > 0 {
        bail!("{bad} fault(s) violated an invariant");
    }
    Ok(())
}
