//! The webhook's metrics: admissions by resource, operation and result; allocation commit
//! latency and batch size; commit retries on write conflicts.

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

#[derive(Clone)]
pub struct Metrics {
    admissions: Family<AdmissionLabels, Counter>,
    commit_seconds: Histogram,
    batch_size: Histogram,
    conflicts: Counter,
    allocations: Counter,
    batches: Counter,
    batch_micros: Counter,
}

impl Metrics {
    /// Registers the metrics in `registry` (one registry per process, passed down).
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            admissions: Family::default(),
            commit_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            conflicts: Counter::default(),
            allocations: Counter::default(),
            batches: Counter::default(),
            batch_micros: Counter::default(),
        };
        let reg = registry.sub_registry_with_prefix("vmdhcp_webhook");
        reg.register(
            "admissions",
            "Admission requests by resource, operation and result",
            m.admissions.clone(),
        );
        reg.register(
            "allocation_commit_seconds",
            "Time to decide and commit one batch of allocations",
            m.commit_seconds.clone(),
        );
        reg.register(
            "allocation_batch_size",
            "Allocation jobs committed in one pool status update",
            m.batch_size.clone(),
        );
        reg.register(
            "commit_conflicts",
            "Pool status updates retried after a 409 Conflict",
            m.conflicts.clone(),
        );
        reg.register(
            "allocations_committed",
            "NIC allocations made durable",
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

    pub fn observe_commit(&self, took: Duration, jobs: usize) {
        self.commit_seconds.observe(took.as_secs_f64());
        self.batches.inc();
        self.batch_micros.inc_by(took.as_micros() as u64);
        self.batch_size.observe(jobs as f64);
    }

    pub fn conflict(&self) {
        self.conflicts.inc();
    }

    /// (batches committed, mean time per batch): for benchmark reports.
    pub fn batch_summary(&self) -> (u64, Duration) {
        let n = self.batches.get();
        let total = Duration::from_micros(self.batch_micros.get());
        (
            n,
            if n == 0 {
                Duration::ZERO
            } else {
                total / n as u32
            },
        )
    }

    pub fn conflicts(&self) -> u64 {
        self.conflicts.get()
    }

    pub fn committed(&self, jobs: usize) {
        self.allocations.inc_by(jobs as u64);
    }

    pub fn allocations_committed(&self) -> u64 {
        self.allocations.get()
    }
}
