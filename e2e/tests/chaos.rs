//! The short fault-injection suite for CI (the whole suite: `make chaos`): with load
//! running, a webhook replica, the controller leader, the active agent, etcd and kube-apiserver killed in
//! turn; after each, every invariant of `vm_dhcp_e2e::chaos` holds (no address or MAC twice,
//! nothing lost, leaks swept within their grace, DHCP back within 5 s of the agent's kill,
//! admission back within the webhook's timeout, one agent holding the server IP). A test
//! binary of its own: it restarts its control plane's etcd and registers the cluster-wide
//! APIService of the aggregated API.

use std::time::{Duration, Instant};

use vm_dhcp_e2e::chaos::{self, Config, Fault};

#[allow(dead_code)]
#[path = "../../tests/support/needs.rs"]
mod needs;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_under_load_keep_every_invariant() {
    // Root for the network namespaces of nodes and guests; ip for them, busybox's udhcpc
    // for the guests.
    if !needs::require(module_path!(), true, &[needs::IP, needs::BUSYBOX]) {
        return;
    }
    let t0 = Instant::now();
    let rows = chaos::run(Config {
        rate: 2.0,
        live: 15,
        guests: 1,
        settle: Duration::from_secs(3),
        faults: vec![
            Fault::WebhookReplica,
            Fault::ControllerLeader,
            Fault::ActiveAgent,
            Fault::EtcdRestart,
            Fault::KubeApiserverRestart,
        ],
    })
    .await
    .unwrap_or_else(|e| panic!("the chaos suite failed: {e:#}"));
    let table = chaos::table(&rows);
    eprintln!(
        "{table}\n{} fault(s) in {:.0} s",
        rows.len(),
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(rows.len(), 5, "{table}");
    assert!(
        rows.iter().all(|r| r.ok()),
        "an invariant was violated:\n{table}"
    );
}
