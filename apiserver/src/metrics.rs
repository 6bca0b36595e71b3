//! The aggregated API server's metrics: requests by verb, resource and code and their latency
//! (until the response starts, so a watch counts its set-up), the watches open, the objects
//! each view holds, and how long the engine takes to apply a batch of source changes.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub verb: String,
    pub resource: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabels {
    pub verb: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub resource: String,
}

#[derive(Clone)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    latency: Family<VerbLabels, Histogram>,
    watches: Family<ResourceLabels, Gauge>,
    objects: Family<ResourceLabels, Gauge>,
    apply_seconds: Histogram,
}

impl Default for Metrics {
    /// Metrics registered nowhere (tests, and servers that do not export them).
    fn default() -> Self {
        Metrics::new(&mut Registry::default())
    }
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 14))
            }),
            watches: Family::default(),
            objects: Family::default(),
            apply_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        };
        let r = registry.sub_registry_with_prefix("vm_dhcp_apiserver");
        r.register(
            "requests",
            "Requests by verb (get, list, watch, or the refused method), resource and HTTP code",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time until the response starts (for a watch: its set-up and replay)",
            m.latency.clone(),
        );
        r.register("watches", "Watches open, by resource", m.watches.clone());
        r.register("view_objects", "Objects each view holds", m.objects.clone());
        r.register(
            "source_apply_seconds",
            "Time to turn a batch of IPPool, IPPoolAddress, agent and lease changes into view changes",
            m.apply_seconds.clone(),
        );
        m
    }

    pub fn request(&self, verb: &str, resource: &str, code: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                verb: verb.to_string(),
                resource: resource.to_string(),
                code,
            })
            .inc();
        self.latency
            .get_or_create(&VerbLabels {
                verb: verb.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Counts a watch as open until the returned guard is dropped.
    pub fn watch_opened(&self, resource: &str) -> WatchGuard {
        let gauge = self
            .watches
            .get_or_create(&ResourceLabels {
                resource: resource.to_string(),
            })
            .clone();
        gauge.inc();
        WatchGuard(gauge)
    }

    pub fn objects(&self, resource: &str, count: usize) {
        self.objects
            .get_or_create(&ResourceLabels {
                resource: resource.to_string(),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn applied(&self, took: Duration) {
        self.apply_seconds.observe(took.as_secs_f64());
    }
}

pub struct WatchGuard(Gauge);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
