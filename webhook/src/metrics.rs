//! The webhook's metrics: admissions by resource, operation and result, and how long they
//! take; per NIC allocation latency through the store; races lost and redone; addresses
//! taken.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    pub resource: String,
    pub operation: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub resource: String,
}

#[derive(Clone)]
pub struct Metrics {
    admissions: Family<AdmissionLabels, Counter>,
    admission_seconds: Family<ResourceLabels, Histogram>,
    commit_seconds: Histogram,
    conflicts: Counter,
    allocations: Counter,
}

fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

impl Metrics {
    /// Registers the metrics in `registry` (one registry per process, passed down).
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            admissions: Family::default(),
            admission_seconds: Family::new_with_constructor(latency_buckets),
            commit_seconds: latency_buckets(),
            conflicts: Counter::default(),
            allocations: Counter::default(),
        };
        let reg = registry.sub_registry_with_prefix("vmdhcp_webhook");
        reg.register(
            "admissions",
            "Admission requests by resource, operation and result",
            m.admissions.clone(),
        );
        reg.register(
            "admission_duration_seconds",
            "Time to answer one admission request, by resource",
            m.admission_seconds.clone(),
        );
        reg.register(
            "allocation_commit_seconds",
            "Time to allocate one NIC through the store (its MAC claim and address object)",
            m.commit_seconds.clone(),
        );
        reg.register(
            "commit_conflicts",
            "Store writes that lost a race (an address or claim taken or changed by another admission) and were redone",
            m.conflicts.clone(),
        );
        reg.register(
            "allocations_committed",
            "Addresses taken (IPPoolAddress objects created)",
            m.allocations.clone(),
        );
        m
    }

    pub fn unregistered() -> Self {
        Self::new(&mut Registry::default())
    }

    pub fn admission(&self, resource: &str, operation: &str, result: &str) {
        self.admissions
            .get_or_create(&AdmissionLabels {
                resource: resource.into(),
                operation: operation.into(),
                result: result.into(),
            })
            .inc();
    }

    pub fn observe_admission(&self, resource: &str, took: Duration) {
        self.admission_seconds
            .get_or_create(&ResourceLabels {
                resource: resource.into(),
            })
            .observe(took.as_secs_f64());
    }

    /// One NIC's allocation took `took`.
    pub fn observe_commit(&self, took: Duration) {
        self.commit_seconds.observe(took.as_secs_f64());
    }

    pub fn conflict(&self) {
        self.conflicts.inc();
    }

    pub fn conflicts(&self) -> u64 {
        self.conflicts.get()
    }

    pub fn committed(&self, n: usize) {
        self.allocations.inc_by(n as u64);
    }

    pub fn allocations_committed(&self) -> u64 {
        self.allocations.get()
    }
}
