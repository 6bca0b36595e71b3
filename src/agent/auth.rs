//! Who may read an agent's leases (`/leases`, `/api/v1/leases`): in the cluster, a caller
//! presenting a bearer token (the aggregated apiserver sends its ServiceAccount token) that
//! kube-apiserver accepts (TokenReview) and whose user may `get` `dhcpleases` of group
//! `dhcp.harvesterhci.io` in the pool's namespace (SubjectAccessReview): exactly who may
//! read the same leases through the aggregated API. Decisions are cached for a short while
//! (allowed and denied alike; an API error is not cached), so the apiserver's poll every
//! second costs two reviews per agent every [`CACHE_TTL`].
//!
//! Offline (`--ippool-file`) there is no cluster to ask: the lease endpoints are open, on
//! the addresses [`super::bind`] chose.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode, header};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

/// The resource a lease reader must be allowed to `get`.
pub const GROUP: &str = "dhcp.harvesterhci.io";
pub const RESOURCE: &str = "dhcpleases";
/// How long a decision is kept.
pub const CACHE_TTL: Duration = Duration::from_secs(10);
/// How long a reader's token review (TokenReview, then SubjectAccessReview) may take.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(3);
/// At most this many cached tokens (the cache is emptied when full).
const CACHE_MAX: usize = 256;

/// A refusal: the status and a message for the body.
pub type Refusal = (StatusCode, String);

/// Decisions by token, with when they were made.
type Cache = HashMap<String, (Result<(), Refusal>, Instant)>;

pub struct Auth {
    client: kube::Client,
    namespace: String,
    cache: Mutex<Cache>,
}

impl Auth {
    /// Readers of the leases of a pool in `namespace`.
    pub fn new(client: kube::Client, namespace: String) -> Self {
        Auth {
            client,
            namespace,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub async fn check(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let token = bearer(headers).ok_or_else(|| {
            (
                StatusCode::UNAUTHORIZED,
                "a bearer token is required (the aggregated apiserver's ServiceAccount token)\n"
                    .to_string(),
            )
        })?;
        let now = Instant::now();
        if let Some((decision, at)) = self.lock().get(token)
            && now.duration_since(*at) < CACHE_TTL
        {
            return decision.clone();
        }
        // A reader does not wait on an apiserver that does not answer (a partitioned node):
        // the check fails closed, quickly.
        let decision = match tokio::time::timeout(REVIEW_TIMEOUT, self.review(token)).await {
            Ok(d) => d,
            Err(_) => Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "cannot check the caller: kube-apiserver did not answer the token review within {REVIEW_TIMEOUT:?}\n"
                ),
            )),
        };
        // An unreachable API is not a decision: ask again next time.
        if decision
            .as_ref()
            .err()
            .is_none_or(|(code, _)| *code != StatusCode::SERVICE_UNAVAILABLE)
        {
            let mut cache = self.lock();
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
            cache.insert(token.to_string(), (decision.clone(), now));
        }
        decision
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn review(&self, token: &str) -> Result<(), Refusal> {
        let unavailable = |what: &str, e: kube::Error| {
            tracing::warn!("lease reader check: {what}: {e}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot check the caller ({what}: {e})\n"),
            )
        };
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: None,
            },
            ..TokenReview::default()
        };
        let review = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| unavailable("TokenReview", e))?;
        let status = review.status.unwrap_or_default();
        let user = status.user.filter(|_| status.authenticated == Some(true));
        let Some(user) = user else {
            return Err((
                StatusCode::UNAUTHORIZED,
                format!(
                    "the token was not accepted{}\n",
                    status.error.map(|e| format!(": {e}")).unwrap_or_default()
                ),
            ));
        };
        let name = user.username.clone().unwrap_or_default();
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                resource_attributes: Some(ResourceAttributes {
                    group: Some(GROUP.to_string()),
                    resource: Some(RESOURCE.to_string()),
                    verb: Some("get".to_string()),
                    namespace: Some(self.namespace.clone()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let sars: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let sar = sars
            .create(&PostParams::default(), &sar)
            .await
            .map_err(|e| unavailable("SubjectAccessReview", e))?;
        if sar.status.is_some_and(|s| s.allowed) {
            Ok(())
        } else {
            Err((
                StatusCode::FORBIDDEN,
                format!(
                    "{name} may not get {RESOURCE}.{GROUP} in namespace {}\n",
                    self.namespace
                ),
            ))
        }
    }
}

/// The token of `Authorization: Bearer <token>`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_header() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            "Bearer abc.def".parse().expect("value"),
        );
        assert_eq!(bearer(&h), Some("abc.def"));
        h.insert(
            header::AUTHORIZATION,
            "bearer  xyz ".parse().expect("value"),
        );
        assert_eq!(bearer(&h), Some("xyz"));
        h.insert(header::AUTHORIZATION, "Basic dTpw".parse().expect("value"));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer ".parse().expect("value"));
        assert_eq!(bearer(&h), None);
    }
}
