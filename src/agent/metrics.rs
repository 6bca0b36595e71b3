//! The agent's counters, registered in the one registry the agent passes down (no globals).
//! The registry prefixes every name with `vmdhcp_agent_`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = [(&'static str, &'static str); 1];

#[derive(Clone)]
pub struct Metrics {
    requests: Family<Labels, Counter>,
    replies: Family<Labels, Counter>,
    drops: Family<Labels, Counter>,
    pub naks: Counter,
    pub declines: Counter,
    pub leases: Gauge,
    pub table_reloads: Family<Labels, Counter>,
    pub handling_seconds: Histogram,
    /// 1 while this agent answers (holds the Lease, or runs without one).
    pub active: Gauge,
    pub takeovers: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            requests: Family::default(),
            replies: Family::default(),
            drops: Family::default(),
            naks: Counter::default(),
            declines: Counter::default(),
            leases: Gauge::default(),
            table_reloads: Family::default(),
            // 1 µs … ~16 ms: handling is a few µs; the top buckets catch stalls.
            handling_seconds: Histogram::new(exponential_buckets(1e-6, 2.0, 15)),
            active: Gauge::default(),
            takeovers: Counter::default(),
        };
        registry.register(
            "requests",
            "DHCP messages received, by message type",
            m.requests.clone(),
        );
        registry.register("replies", "DHCP replies sent, by type", m.replies.clone());
        registry.register(
            "drops",
            "Messages not answered, by reason (malformed, unknown_mac, other_server, …)",
            m.drops.clone(),
        );
        registry.register("naks", "DHCPNAKs sent", m.naks.clone());
        registry.register(
            "declines",
            "DHCPDECLINEs received: a client found its address in use (address conflict)",
            m.declines.clone(),
        );
        registry.register(
            "leases",
            "Leases served: MACs with an allocation in the pool",
            m.leases.clone(),
        );
        registry.register(
            "table_reloads",
            "Lease table rebuilds from the pool, by result",
            m.table_reloads.clone(),
        );
        registry.register(
            "handling_seconds",
            "Time from a received datagram to its reply being ready",
            m.handling_seconds.clone(),
        );
        registry.register(
            "active",
            "1 when this agent answers DHCP (holds the pool's Lease, or runs without one), 0 on standby",
            m.active.clone(),
        );
        registry.register(
            "takeovers",
            "Times this agent took the pool's Lease and became active",
            m.takeovers.clone(),
        );
        m
    }

    pub fn request(&self, message_type: &'static str) {
        self.requests.get_or_create(&[("type", message_type)]).inc();
    }

    pub fn reply(&self, kind: &'static str) {
        self.replies.get_or_create(&[("type", kind)]).inc();
    }

    pub fn drop(&self, reason: &'static str) {
        self.drops.get_or_create(&[("reason", reason)]).inc();
    }

    #[cfg(test)]
    pub fn drops(&self, reason: &'static str) -> u64 {
        self.drops.get_or_create(&[("reason", reason)]).get()
    }

    pub fn reload(&self, result: &'static str) {
        self.table_reloads
            .get_or_create(&[("result", result)])
            .inc();
    }
}
