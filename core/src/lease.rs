//! Who holds a coordination.k8s.io Lease, decided without trusting any clock but our own.
//!
//! One rule set for the controller's leader election and the agents' activation. Times are
//! this process's monotonic clock, as a `Duration` since an origin the caller picks; the
//! Lease's `renewTime` (another node's wall clock) is never read, so clock skew between
//! nodes cannot make two holders. This is how client-go decides:
//!
//! - **Standby.** A Lease held by someone else has expired only when its record (its
//!   resourceVersion) has stayed the same for a whole `leaseDurationSeconds` *as observed
//!   here*. A record seen for the first time counts from when it was seen.
//! - **Holder.** The holder counts its deadline (the fence) from when it *sent* its last
//!   successful write: `sent + duration − margin`. Past the fence it is no longer the holder,
//!   whatever its pending requests do.
//!
//! The standby observes the holder's last write after it was sent, so the standby's
//! expiry (`observed + duration`) is always later than the holder's fence
//! (`sent + duration − margin`), as long as the two clocks tick at about the same rate. A
//! standby that missed a renewal and writes over it is refused by the resourceVersion guard.

use std::time::Duration;

/// What a Lease says, as far as the decision goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// `metadata.resourceVersion`: any write changes it.
    pub version: String,
    /// `spec.holderIdentity`; `None` when empty (released).
    pub holder: Option<String>,
    /// `spec.leaseDurationSeconds`, at least one second.
    pub duration: Duration,
}

/// What the runner should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// We hold it: renew (replace with the version we hold).
    Renew,
    /// Nobody has created the Lease: create it.
    Create,
    /// Free, expired or already ours: take it over (replace with the version observed).
    Take,
    /// Held by `holder`; look again at `until` (when it would expire) or on a change.
    Wait { holder: String, until: Duration },
    /// Not eligible (e.g. the agent cannot serve yet): do not compete.
    Idle,
}

/// The state of one candidate.
#[derive(Debug, Clone)]
pub struct Elector {
    me: String,
    duration: Duration,
    seen: Option<Record>,
    /// Whether the Lease was read at all (absent and unknown differ).
    known: bool,
    /// When `seen` last changed, here.
    seen_at: Duration,
    /// While we hold the Lease: the instant we must have let go by.
    fence: Option<Duration>,
}

impl Elector {
    pub fn new(me: impl Into<String>, duration: Duration) -> Self {
        Elector {
            me: me.into(),
            duration: duration.max(Duration::from_secs(1)),
            seen: None,
            known: false,
            seen_at: Duration::ZERO,
            fence: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.me
    }

    /// The lease duration this candidate writes.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// Renew three times per duration, so that one lost request is not a failover.
    pub fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    /// How long before a standby could take over the holder lets go: room for stepping
    /// down (an agent removes its server IP) and for clocks that tick at slightly
    /// different rates.
    pub fn margin(&self) -> Duration {
        (self.duration / 5).max(Duration::from_millis(500))
    }

    /// Any request of the runner is abandoned after this long (and never outlives the fence).
    pub fn request_timeout(&self) -> Duration {
        self.renew_every()
    }

    /// The record as last written or read (the version a write must carry).
    pub fn seen(&self) -> Option<&Record> {
        self.seen.as_ref()
    }

    /// A read or watch event: `None` when the Lease does not exist.
    pub fn observe(&mut self, record: Option<Record>, now: Duration) {
        if !self.known || self.seen != record {
            self.seen_at = now;
        }
        self.known = true;
        self.seen = record;
    }

    /// Whether the fence still stands at `now`.
    pub fn holding(&self, now: Duration) -> bool {
        self.fence.is_some_and(|f| now < f)
    }

    /// The instant we must have let go by, while we hold the Lease.
    pub fn fence(&self) -> Option<Duration> {
        self.fence
    }

    /// Our write (create, take or renew) was accepted; it was sent at `sent`.
    pub fn won(&mut self, record: Record, sent: Duration, now: Duration) {
        self.observe(Some(record), now);
        let fence = sent + self.duration;
        self.fence = Some(fence.saturating_sub(self.margin()));
    }

    /// We no longer hold the Lease (lost, fence passed, stepped down or released).
    pub fn step_down(&mut self, now: Duration) {
        self.fence = None;
        // Our own record must age a full duration before we compete again, as anyone's.
        self.seen_at = now;
    }

    /// A record from a watch or read while holding: `Some(holder)` when someone else's
    /// name is in it (we lost; step down).
    pub fn taken_by(&self, record: Option<&Record>) -> Option<String> {
        match record {
            None => Some(String::new()),
            Some(r) => r.holder.clone().filter(|h| *h != self.me),
        }
    }

    /// The next step at `now`. `eligible` false: do not compete (a holder that becomes
    /// ineligible should release; the runner does that).
    pub fn next(&self, now: Duration, eligible: bool) -> Next {
        if self.holding(now) {
            return Next::Renew;
        }
        if !eligible {
            return Next::Idle;
        }
        if !self.known {
            // Read first: the runner reads before it decides.
            return Next::Wait {
                holder: String::new(),
                until: now,
            };
        }
        let Some(record) = &self.seen else {
            return Next::Create;
        };
        match &record.holder {
            None => Next::Take,
            Some(h) if *h == self.me => Next::Take,
            Some(h) => {
                let until = self.seen_at + record.duration;
                if now >= until {
                    Next::Take
                } else {
                    Next::Wait {
                        holder: h.clone(),
                        until,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(version: &str, holder: Option<&str>, secs: u64) -> Record {
        Record {
            version: version.into(),
            holder: holder.map(str::to_string),
            duration: Duration::from_secs(secs),
        }
    }

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    #[test]
    fn absent_lease_is_created_and_free_lease_taken() {
        let mut e = Elector::new("a", s(15.0));
        assert!(
            matches!(e.next(s(0.0), true), Next::Wait { .. }),
            "read first"
        );
        e.observe(None, s(0.0));
        assert_eq!(e.next(s(0.0), true), Next::Create);
        e.observe(Some(rec("1", None, 15)), s(1.0));
        assert_eq!(e.next(s(1.0), true), Next::Take);
        assert_eq!(e.next(s(1.0), false), Next::Idle);
    }

    #[test]
    fn a_held_lease_expires_only_after_a_whole_duration_of_no_change_seen_here() {
        let mut e = Elector::new("b", s(15.0));
        e.observe(Some(rec("7", Some("a"), 15)), s(100.0));
        assert_eq!(
            e.next(s(114.9), true),
            Next::Wait {
                holder: "a".into(),
                until: s(115.0)
            }
        );
        // A renewal (new version) restarts the count.
        e.observe(Some(rec("8", Some("a"), 15)), s(110.0));
        assert!(matches!(e.next(s(124.0), true), Next::Wait { .. }));
        // The same record seen again does not.
        e.observe(Some(rec("8", Some("a"), 15)), s(120.0));
        assert_eq!(e.next(s(125.0), true), Next::Take);
    }

    #[test]
    fn the_remote_clock_is_never_read_so_skew_cannot_elect_two() {
        // There is no renewTime in a Record at all: a holder whose clock is an hour ahead
        // or behind changes nothing. What matters is our own observation of versions.
        let mut standby = Elector::new("b", s(5.0));
        let mut holder = Elector::new("a", s(5.0));
        // The holder sends its renewal at t=10.0 (its clock), accepted as version 2.
        holder.won(rec("2", Some("a"), 5), s(10.0), s(10.05));
        // The standby sees it via its watch at its own t=10.1 (clocks need not agree on
        // the origin: only on the rate).
        standby.observe(Some(rec("2", Some("a"), 5)), s(10.1));
        // The holder's renewals then hang (the apiserver stops answering).
        let fence = holder.fence().expect("fence");
        assert_eq!(fence, s(14.0), "sent + duration - margin (1 s)");
        assert!(holder.holding(s(13.99)));
        assert!(!holder.holding(s(14.0)));
        assert_eq!(holder.next(s(14.0), true), Next::Take, "re-take, not renew");
        // The standby may take over only after the holder let go, with the margin between.
        match standby.next(s(14.0), true) {
            Next::Wait { until, .. } => assert!(until >= fence + holder.margin()),
            other => panic!("standby took over at the fence: {other:?}"),
        }
        assert_eq!(standby.next(s(15.1), true), Next::Take);
    }

    #[test]
    fn fence_counts_from_the_send_not_the_answer() {
        let mut e = Elector::new("a", s(10.0));
        e.won(rec("3", Some("a"), 10), s(50.0), s(53.0));
        assert_eq!(e.fence(), Some(s(58.0)));
        assert_eq!(e.next(s(57.0), true), Next::Renew);
    }

    #[test]
    fn taken_by_someone_else_or_deleted_is_a_loss() {
        let mut e = Elector::new("a", s(10.0));
        e.won(rec("3", Some("a"), 10), s(0.0), s(0.0));
        assert_eq!(e.taken_by(Some(&rec("4", Some("a"), 10))), None);
        assert_eq!(e.taken_by(Some(&rec("4", None, 10))), None);
        assert_eq!(
            e.taken_by(Some(&rec("4", Some("b"), 10))),
            Some("b".to_string())
        );
        assert_eq!(e.taken_by(None), Some(String::new()));
    }

    #[test]
    fn after_stepping_down_our_own_record_ages_like_anyone_elses() {
        let mut e = Elector::new("a", s(10.0));
        e.won(rec("3", Some("a"), 10), s(0.0), s(0.0));
        e.step_down(s(5.0));
        assert!(!e.holding(s(5.0)));
        // Ours by name: taking it back at once is allowed (client-go does the same; the
        // resourceVersion guard refuses it if anyone wrote since).
        assert_eq!(e.next(s(5.0), true), Next::Take);
        // Someone else's record seen at 5.0 waits until 15.0.
        e.observe(Some(rec("4", Some("b"), 10)), s(5.0));
        assert!(matches!(e.next(s(14.9), true), Next::Wait { .. }));
    }

    #[test]
    fn timings_scale_with_the_duration() {
        let e = Elector::new("a", s(15.0));
        assert_eq!(e.renew_every(), s(5.0));
        assert_eq!(e.margin(), s(3.0));
        let short = Elector::new("a", s(2.0));
        assert_eq!(short.margin(), s(0.5));
        assert_eq!(Elector::new("a", Duration::ZERO).duration(), s(1.0));
    }
}
