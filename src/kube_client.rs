//! The Kubernetes client every subcommand uses, with every call bounded in time: connecting
//! (10 s), and each request until its answer ([`REQUEST_TIMEOUT`]) — watches excepted, which
//! kube's watcher bounds itself (it reconnects when a watch stays silent past its server-side
//! timeout plus a margin). Without these, a kube-apiserver that accepts connections but never
//! answers would hold a caller forever (kube's client has no timeout by default).

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::http::Request;

/// Connecting to the apiserver (TCP and TLS).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// One request until its response head (watches excepted).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A client from `--kubeconfig`/KUBECONFIG when given, else the usual inference (the user's
/// kubeconfig, then the in-cluster service account).
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client> {
    let mut config = match kubeconfig {
        Some(paths) => {
            let kc = read_kubeconfigs(paths)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {} (--kubeconfig)", paths.display()))?
        }
        None => kube::Config::infer().await.context(
            "no --kubeconfig, no usable KUBECONFIG or ~/.kube/config, and no in-cluster service account",
        )?,
    };
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.write_timeout = Some(REQUEST_TIMEOUT);
    let builder =
        kube::client::ClientBuilder::try_from(config).context("building the Kubernetes client")?;
    Ok(builder
        .with_layer(&RequestTimeoutLayer(REQUEST_TIMEOUT))
        .build())
}

/// One kubeconfig from `paths` (one path, or several separated by `:` as in `KUBECONFIG`:
/// merged, the first file's entries winning, as kubectl does).
fn read_kubeconfigs(paths: &Path) -> Result<kube::config::Kubeconfig> {
    let mut merged: Option<kube::config::Kubeconfig> = None;
    for path in std::env::split_paths(paths.as_os_str()).filter(|p| !p.as_os_str().is_empty()) {
        let kc = kube::config::Kubeconfig::read_from(&path)
            .with_context(|| format!("reading kubeconfig {} (--kubeconfig)", path.display()))?;
        merged = Some(match merged {
            None => kc,
            Some(m) => m
                .merge(kc)
                .with_context(|| format!("merging kubeconfig {}", path.display()))?,
        });
    }
    merged.with_context(|| {
        format!(
            "--kubeconfig {:?} names no file",
            paths.display().to_string()
        )
    })
}

/// Fails a request that has no response within the limit, unless it is a watch.
#[derive(Clone, Copy)]
pub struct RequestTimeoutLayer(pub Duration);

impl<S> tower::Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestTimeout {
            inner,
            limit: self.0,
        }
    }
}

#[derive(Clone)]
pub struct RequestTimeout<S> {
    inner: S,
    limit: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Whether a request is a watch (`?watch=true` or `?watch=1`).
fn is_watch<B>(req: &Request<B>) -> bool {
    req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|kv| matches!(kv, "watch=true" | "watch=1"))
    })
}

impl<S, B> tower::Service<Request<B>> for RequestTimeout<S>
where
    S: tower::Service<Request<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let watch = is_watch(&req);
        let what = format!("{} {}", req.method(), req.uri().path());
        let limit = self.limit;
        let answer = self.inner.call(req);
        Box::pin(async move {
            if watch {
                return answer.await.map_err(Into::into);
            }
            match tokio::time::timeout(limit, answer).await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err(format!(
                    "{what}: no answer from the Kubernetes API within {limit:?}; it may be overloaded or unreachable"
                )
                .into()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service, ServiceExt};

    /// A service that never answers.
    #[derive(Clone)]
    struct Stuck;

    impl Service<Request<()>> for Stuck {
        type Response = ();
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;
        fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Request<()>) -> Self::Future {
            Box::pin(std::future::pending())
        }
    }

    fn request(uri: &str) -> Request<()> {
        Request::get(uri).body(()).expect("request")
    }

    #[test]
    fn several_kubeconfig_paths_are_merged_and_a_missing_one_is_named() {
        let dir = std::env::temp_dir().join(format!("vm-dhcp-kc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let one = |name: &str, server: &str| {
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {server}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\nusers:\n- name: {name}\n  user:\n    token: t\ncurrent-context: {name}\n"
            )
        };
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, one("a", "https://10.0.0.1:6443")).expect("a");
        std::fs::write(&b, one("b", "https://10.0.0.2:6443")).expect("b");
        let both = std::env::join_paths([&a, &b]).expect("join");
        let kc = read_kubeconfigs(Path::new(&both)).expect("merged");
        assert_eq!(kc.clusters.len(), 2);
        assert_eq!(
            kc.current_context.as_deref(),
            Some("a"),
            "the first file wins"
        );
        let missing = std::env::join_paths([&a, &dir.join("nope")]).expect("join");
        let err = format!(
            "{:#}",
            read_kubeconfigs(Path::new(&missing)).expect_err("missing")
        );
        assert!(err.contains("nope"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_request_without_an_answer_fails_with_what_it_was_and_a_watch_is_left_alone() {
        let mut svc = RequestTimeoutLayer(Duration::from_millis(100)).layer(Stuck);
        let err = svc
            .ready()
            .await
            .expect("ready")
            .call(request("/api/v1/namespaces/ns/pods/p"))
            .await
            .expect_err("times out");
        let text = err.to_string();
        assert!(
            text.starts_with("GET /api/v1/namespaces/ns/pods/p: no answer")
                && text.contains("100ms"),
            "{text}"
        );
        for watch in [
            "/api/v1/pods?watch=true&resourceVersion=1",
            "/api/v1/pods?watch=1",
        ] {
            let call = svc.ready().await.expect("ready").call(request(watch));
            assert!(
                tokio::time::timeout(Duration::from_millis(500), call)
                    .await
                    .is_err(),
                "a watch ({watch}) was cut by the request timeout"
            );
        }
        assert!(!is_watch(&request("/api/v1/pods?watchx=true")));
    }
}
