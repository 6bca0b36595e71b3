//! Who is asking, and may they: front-proxy authentication (the aggregator's client
//! certificate, then the `X-Remote-*` headers it sets) and delegated authorization with
//! SubjectAccessReviews, as `k8s.io/apiserver` does for extension servers.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};

/// The client certificate the TLS layer verified against the requestheader CA, put into the
/// request's extensions. Its absence means: no certificate, so no trusted headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedClientCert {
    pub common_name: String,
}

/// The subject common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(cn)
}

/// The request-header settings of `kube-system/extension-apiserver-authentication`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHeaderConfig {
    pub allowed_names: Vec<String>,
    pub username_headers: Vec<String>,
    pub group_headers: Vec<String>,
    pub extra_prefixes: Vec<String>,
    pub uid_headers: Vec<String>,
}

impl Default for RequestHeaderConfig {
    /// The delegating defaults of k8s.io/apiserver.
    fn default() -> Self {
        RequestHeaderConfig {
            allowed_names: Vec::new(),
            username_headers: vec!["x-remote-user".into()],
            group_headers: vec!["x-remote-group".into()],
            extra_prefixes: vec!["x-remote-extra-".into()],
            uid_headers: Vec::new(),
        }
    }
}

pub const AUTH_CONFIGMAP_NAMESPACE: &str = "kube-system";
pub const AUTH_CONFIGMAP_NAME: &str = "extension-apiserver-authentication";
pub const REQUESTHEADER_CA_KEY: &str = "requestheader-client-ca-file";

impl RequestHeaderConfig {
    /// From the ConfigMap's data: the settings and the requestheader CA (PEM). Each list is
    /// a JSON array in a string, e.g. `'["X-Remote-User"]'`.
    pub fn from_configmap(data: &BTreeMap<String, String>) -> Result<(Self, String), String> {
        let ca = data
            .get(REQUESTHEADER_CA_KEY)
            .filter(|s| !s.trim().is_empty())
            .cloned()
            .ok_or_else(|| {
                format!(
                    "{AUTH_CONFIGMAP_NAMESPACE}/{AUTH_CONFIGMAP_NAME} has no {REQUESTHEADER_CA_KEY}: start kube-apiserver with --requestheader-client-ca-file (the aggregation layer)"
                )
            })?;
        let list = |key: &str, default: Vec<String>| -> Result<Vec<String>, String> {
            match data.get(key).map(|s| s.trim()).filter(|s| !s.is_empty()) {
                None => Ok(default),
                Some(text) => serde_json::from_str::<Vec<String>>(text).map_err(|e| {
                    format!("{AUTH_CONFIGMAP_NAME} key {key}: expected a JSON list of strings: {e}")
                }),
            }
        };
        let lower = |v: Vec<String>| v.into_iter().map(|s| s.to_ascii_lowercase()).collect();
        let d = RequestHeaderConfig::default();
        Ok((
            RequestHeaderConfig {
                allowed_names: list("requestheader-allowed-names", Vec::new())?,
                username_headers: lower(list(
                    "requestheader-username-headers",
                    d.username_headers,
                )?),
                group_headers: lower(list("requestheader-group-headers", d.group_headers)?),
                extra_prefixes: lower(list(
                    "requestheader-extra-headers-prefix",
                    d.extra_prefixes,
                )?),
                uid_headers: lower(list("requestheader-uid-headers", d.uid_headers)?),
            },
            ca,
        ))
    }
}

/// An authenticated user.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserInfo {
    pub name: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

pub const AUTHENTICATED_GROUP: &str = "system:authenticated";
pub const MASTERS_GROUP: &str = "system:masters";

/// The user of a request: only when the TLS layer verified a front-proxy certificate with an
/// allowed name are the headers trusted. Anything else is not authenticated.
pub fn authenticate(
    config: &RequestHeaderConfig,
    cert: Option<&VerifiedClientCert>,
    headers: &HeaderMap,
) -> Result<UserInfo, String> {
    let Some(cert) = cert else {
        return Err("no client certificate signed by the requestheader CA was presented".into());
    };
    if !config.allowed_names.is_empty() && !config.allowed_names.contains(&cert.common_name) {
        return Err(format!(
            "client certificate CN {:?} is not in requestheader-allowed-names",
            cert.common_name
        ));
    }
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect()
    };
    let name = config
        .username_headers
        .iter()
        .find_map(|h| values(h).into_iter().find(|v| !v.is_empty()))
        .ok_or("the front proxy sent no user name header")?;
    let mut groups: Vec<String> = config
        .group_headers
        .iter()
        .flat_map(|h| values(h))
        .collect();
    if !groups.iter().any(|g| g == AUTHENTICATED_GROUP) {
        groups.push(AUTHENTICATED_GROUP.into());
    }
    let uid = config
        .uid_headers
        .iter()
        .find_map(|h| values(h).into_iter().next());
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (header, value) in headers {
        let header = header.as_str(); // lower case in http
        for prefix in &config.extra_prefixes {
            if let Some(suffix) = header.strip_prefix(prefix.as_str()) {
                let key = percent_encoding::percent_decode_str(suffix)
                    .decode_utf8_lossy()
                    .to_lowercase();
                if let Ok(v) = value.to_str() {
                    extra.entry(key).or_default().push(v.to_string());
                }
            }
        }
    }
    Ok(UserInfo {
        name,
        uid,
        groups,
        extra,
    })
}

/// What a request does, in authorization terms.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Attributes {
    Resource {
        verb: String,
        namespace: String,
        resource: String,
        name: String,
    },
    NonResource {
        verb: String,
        path: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
}

pub type AuthzFuture<'a> = Pin<Box<dyn Future<Output = Result<Decision, String>> + Send + 'a>>;

/// Decides whether a user may do something. The real one posts SubjectAccessReviews; tests
/// use a table.
pub trait Authorizer: Send + Sync + 'static {
    fn authorize<'a>(&'a self, user: &'a UserInfo, attrs: &'a Attributes) -> AuthzFuture<'a>;
}

/// The SubjectAccessReview asking whether `user` may do `attrs`.
pub fn subject_access_review(user: &UserInfo, attrs: &Attributes) -> SubjectAccessReview {
    let (resource_attributes, non_resource_attributes) = match attrs {
        Attributes::Resource {
            verb,
            namespace,
            resource,
            name,
        } => (
            Some(ResourceAttributes {
                group: Some(crate::GROUP.into()),
                version: Some(crate::VERSION.into()),
                resource: Some(resource.clone()),
                verb: Some(verb.clone()),
                namespace: Some(namespace.clone()).filter(|s| !s.is_empty()),
                name: Some(name.clone()).filter(|s| !s.is_empty()),
                ..Default::default()
            }),
            None,
        ),
        Attributes::NonResource { verb, path } => (
            None,
            Some(NonResourceAttributes {
                path: Some(path.clone()),
                verb: Some(verb.clone()),
            }),
        ),
    };
    SubjectAccessReview {
        metadata: Default::default(),
        spec: SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            uid: user.uid.clone(),
            groups: Some(user.groups.clone()),
            extra: Some(user.extra.clone()).filter(|e| !e.is_empty()),
            resource_attributes,
            non_resource_attributes,
        },
        status: None,
    }
}

/// The decision a SubjectAccessReview came back with.
pub fn decision_of(review: &SubjectAccessReview) -> Decision {
    let status = review.status.as_ref();
    Decision {
        allowed: status.is_some_and(|s| s.allowed && s.denied != Some(true)),
        reason: status
            .and_then(|s| s.reason.clone().or_else(|| s.evaluation_error.clone()))
            .unwrap_or_default(),
    }
}

/// The message of a 403, in kube-apiserver's words.
pub fn forbidden_message(user: &UserInfo, attrs: &Attributes, reason: &str) -> String {
    let base = match attrs {
        Attributes::Resource {
            verb,
            namespace,
            resource,
            name,
        } => {
            let what = if name.is_empty() {
                format!("{resource}.{}", crate::GROUP)
            } else {
                format!("{resource}.{} {name:?}", crate::GROUP)
            };
            let scope = if namespace.is_empty() {
                "at the cluster scope".to_string()
            } else {
                format!("in the namespace {namespace:?}")
            };
            format!(
                "{what} is forbidden: User {:?} cannot {verb} resource {resource:?} in API group {:?} {scope}",
                user.name,
                crate::GROUP
            )
        }
        Attributes::NonResource { verb, path } => format!(
            "forbidden: User {:?} cannot {verb} path {path:?}",
            user.name
        ),
    };
    if reason.is_empty() {
        base
    } else {
        format!("{base}: {reason}")
    }
}

/// Caches decisions for a short time (k8s.io/apiserver: 10 s for allow and deny) and allows
/// `system:masters` without asking, as the Go library does.
pub struct CachedAuthorizer {
    inner: Arc<dyn Authorizer>,
    ttl: Duration,
    cache: Mutex<HashMap<(UserInfoKey, Attributes), (Decision, Instant)>>,
}

type UserInfoKey = (
    String,
    Option<String>,
    Vec<String>,
    BTreeMap<String, Vec<String>>,
);

impl CachedAuthorizer {
    pub fn new(inner: Arc<dyn Authorizer>, ttl: Duration) -> Self {
        CachedAuthorizer {
            inner,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }
}

impl Authorizer for CachedAuthorizer {
    fn authorize<'a>(&'a self, user: &'a UserInfo, attrs: &'a Attributes) -> AuthzFuture<'a> {
        Box::pin(async move {
            if user.groups.iter().any(|g| g == MASTERS_GROUP) {
                return Ok(Decision {
                    allowed: true,
                    reason: String::new(),
                });
            }
            let key = (
                (
                    user.name.clone(),
                    user.uid.clone(),
                    user.groups.clone(),
                    user.extra.clone(),
                ),
                attrs.clone(),
            );
            let now = Instant::now();
            {
                let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((d, at)) = cache.get(&key)
                    && now.duration_since(*at) < self.ttl
                {
                    return Ok(d.clone());
                }
            }
            let decision = self.inner.authorize(user, attrs).await?;
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            // Bounded: drop the expired entries when it grows.
            if cache.len() > 10_000 {
                let ttl = self.ttl;
                cache.retain(|_, (_, at)| now.duration_since(*at) < ttl);
            }
            cache.insert(key, (decision.clone(), now));
            Ok(decision)
        })
    }
}

/// The live request-header settings (the ConfigMap can change).
pub type SharedRequestHeaderConfig = Arc<RwLock<RequestHeaderConfig>>;

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn config() -> RequestHeaderConfig {
        let data: BTreeMap<String, String> = [
            ("requestheader-client-ca-file", "PEM"),
            ("requestheader-allowed-names", r#"["front-proxy-client"]"#),
            ("requestheader-username-headers", r#"["X-Remote-User"]"#),
            ("requestheader-group-headers", r#"["X-Remote-Group"]"#),
            (
                "requestheader-extra-headers-prefix",
                r#"["X-Remote-Extra-"]"#,
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        RequestHeaderConfig::from_configmap(&data)
            .expect("config")
            .0
    }

    #[test]
    fn trusted_headers_make_the_user() {
        let cert = VerifiedClientCert {
            common_name: "front-proxy-client".into(),
        };
        let h = headers(&[
            ("x-remote-user", "alice"),
            ("x-remote-group", "devs"),
            ("x-remote-group", "ops"),
            ("x-remote-extra-scopes", "a"),
            ("x-remote-extra-scopes", "b"),
            ("x-remote-extra-acme.com%2Fproject", "p1"),
        ]);
        let user = authenticate(&config(), Some(&cert), &h).expect("authenticated");
        assert_eq!(user.name, "alice");
        assert_eq!(user.groups, vec!["devs", "ops", AUTHENTICATED_GROUP]);
        assert_eq!(user.extra["scopes"], vec!["a", "b"]);
        assert_eq!(user.extra["acme.com/project"], vec!["p1"]);
    }

    #[test]
    fn headers_without_a_certificate_or_from_another_name_are_ignored() {
        let h = headers(&[
            ("x-remote-user", "admin"),
            ("x-remote-group", MASTERS_GROUP),
        ]);
        assert!(authenticate(&config(), None, &h).is_err());
        let other = VerifiedClientCert {
            common_name: "someone-else".into(),
        };
        let err = authenticate(&config(), Some(&other), &h).expect_err("CN not allowed");
        assert!(err.contains("someone-else"), "{err}");
        let fp = VerifiedClientCert {
            common_name: "front-proxy-client".into(),
        };
        assert!(authenticate(&config(), Some(&fp), &headers(&[])).is_err());
    }

    #[test]
    fn configmap_without_the_ca_is_an_error_that_says_what_to_do() {
        let err = RequestHeaderConfig::from_configmap(&BTreeMap::new()).expect_err("no CA");
        assert!(err.contains("--requestheader-client-ca-file"), "{err}");
    }

    #[test]
    fn common_name_of_an_rcgen_certificate() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "front-proxy-client");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(
            common_name(cert.der()).as_deref(),
            Some("front-proxy-client")
        );
        assert_eq!(common_name(b"not a certificate"), None);
    }

    #[test]
    fn forbidden_message_has_kubernetes_shape() {
        let user = UserInfo {
            name: "bob".into(),
            ..Default::default()
        };
        let attrs = Attributes::Resource {
            verb: "list".into(),
            namespace: "ns1".into(),
            resource: "ipamallocations".into(),
            name: String::new(),
        };
        assert_eq!(
            forbidden_message(&user, &attrs, ""),
            "ipamallocations.dhcp.harvesterhci.io is forbidden: User \"bob\" cannot list resource \"ipamallocations\" in API group \"dhcp.harvesterhci.io\" in the namespace \"ns1\""
        );
    }
}
