//! Leader election with a coordination.k8s.io Lease: acquire when free or expired, renew
//! with the resourceVersion guard, give up (and stop writing) when renewal fails for longer
//! than the lease, release on shutdown so a standby takes over at once.

use std::time::Duration;

use anyhow::{Result, bail};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};

use super::{ControllerArgs, is_conflict, is_not_found};

fn api(client: &kube::Client, args: &ControllerArgs) -> Api<Lease> {
    Api::namespaced(client.clone(), &args.leader_election_namespace)
}

fn duration(args: &ControllerArgs) -> i32 {
    i32::try_from(args.leader_election_lease_seconds.max(2)).unwrap_or(15)
}

/// One attempt: Ok(true) when we hold the Lease afterwards.
async fn try_hold(client: &kube::Client, args: &ControllerArgs, me: &str) -> Result<bool> {
    let leases = api(client, args);
    let name = &args.leader_election_name;
    let now = Timestamp::now();
    let Some(mut lease) = leases.get_opt(name).await? else {
        let lease: Lease = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"holderIdentity": me, "leaseDurationSeconds": duration(args),
                     "acquireTime": MicroTime(now), "renewTime": MicroTime(now),
                     "leaseTransitions": 0}
        }))?;
        return match leases.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e.into()),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let expired = spec.renew_time.as_ref().is_none_or(|t| {
        let d = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
        t.0 + d < now
    });
    if !holder.is_empty() && holder != me && !expired {
        return Ok(false);
    }
    if holder != me {
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.holder_identity = Some(me.to_string());
    spec.lease_duration_seconds = Some(duration(args));
    spec.renew_time = Some(MicroTime(now));
    // `replace` carries the resourceVersion we read: a concurrent candidate gets 409.
    match leases.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(e) if is_conflict(&e) || is_not_found(&e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Waits until this replica holds the Lease.
pub async fn acquire(client: &kube::Client, args: &ControllerArgs, me: &str) -> Result<()> {
    let retry = Duration::from_secs(2)
        .min(Duration::from_secs(args.leader_election_lease_seconds.max(2)) / 3);
    let mut logged = false;
    loop {
        match try_hold(client, args, me).await {
            Ok(true) => return Ok(()),
            Ok(false) => {
                if !logged {
                    tracing::info!(
                        lease = %format!("{}/{}", args.leader_election_namespace, args.leader_election_name),
                        "another replica leads; standing by (serving metrics and readiness)"
                    );
                    logged = true;
                }
            }
            Err(e) => tracing::warn!(error = %e, "leader election: cannot read or write the Lease"),
        }
        tokio::time::sleep(retry).await;
    }
}

/// Renews until renewal fails for longer than the lease allows; then returns an error so the
/// process stops writing (another replica may lead by now).
pub async fn keep(client: &kube::Client, args: &ControllerArgs, me: &str) -> Result<()> {
    let lease = Duration::from_secs(args.leader_election_lease_seconds.max(2));
    let renew_every = lease / 3;
    // Give up a third of the lease before it expires: no two leaders write at once.
    let deadline = lease * 2 / 3;
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(renew_every).await;
        match try_hold(client, args, me).await {
            Ok(true) => last_ok = tokio::time::Instant::now(),
            Ok(false) => bail!(
                "leadership lost: another replica holds the Lease; exiting so a restart stands by"
            ),
            Err(e) => tracing::warn!(error = %e, "leader election: renewal failed"),
        }
        if last_ok.elapsed() > deadline {
            bail!("leadership lost: the Lease could not be renewed for {deadline:?}; exiting");
        }
    }
}

/// Gives the Lease up (on shutdown), so that a standby does not wait for it to expire.
pub async fn release(client: &kube::Client, args: &ControllerArgs, me: &str) {
    let leases = api(client, args);
    let Ok(Some(mut lease)) = leases.get_opt(&args.leader_election_name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(me) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    if leases
        .replace(&args.leader_election_name, &PostParams::default(), &lease)
        .await
        .is_ok()
    {
        tracing::info!("leader Lease released");
    }
}
