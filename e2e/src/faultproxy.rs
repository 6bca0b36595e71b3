//! A TCP fault proxy for tests: put it between a component and what it talks to (a
//! component's kubeconfig pointing at the proxy instead of kube-apiserver, an agent's port,
//! etcd's client port), then inject faults while the component runs.
//!
//! - [`Mode::Forward`]: bytes flow both ways, as a direct connection.
//! - [`Mode::Pause`]: a wedged peer. Open connections stay open but carry no byte in either
//!   direction; new connections are accepted (the kernel's backlog) and held, not forwarded.
//!   [`FaultProxy::resume`] lets everything that was held continue where it stopped, so a
//!   client sees a peer that stopped answering for a while, not an error.
//! - [`Mode::Reject`]: a dead peer. Every open connection is reset, and new connections are
//!   accepted and reset at once (what a client sees when the process behind a port is gone).
//!
//! The proxy listens on loopback only; it forwards to whatever address it is given (tests
//! give loopback or a namespace they created). Its tasks run on the runtime that started it
//! and stop when the [`FaultProxy`] is dropped, closing every connection.
//!
//! ```no_run
//! # async fn example(cp: &vm_dhcp_e2e::ControlPlane) -> anyhow::Result<()> {
//! use vm_dhcp_e2e::faultproxy::FaultProxy;
//! let target = std::net::SocketAddr::from(([127, 0, 0, 1], cp.apiserver_port));
//! let proxy = FaultProxy::start(target).await?;
//! let kubeconfig = proxy.kubeconfig_for(cp, &cp.dir.join("through-proxy.kubeconfig"))?;
//! // ... start a component with `--kubeconfig <kubeconfig>` ...
//! proxy.pause(); // kube-apiserver wedged
//! tokio::time::sleep(std::time::Duration::from_secs(30)).await;
//! proxy.resume();
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster::ControlPlane;

/// What the proxy does with connections (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Forward,
    Pause,
    Reject,
}

/// The proxy's internal state: the mode plus a stop flag for when it is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Mode(Mode),
    Closed,
}

struct Shared {
    state: watch::Sender<State>,
    target: Mutex<SocketAddr>,
    open: AtomicUsize,
    accepted: AtomicU64,
    /// Connections that could not reach the target.
    failed: AtomicU64,
}

/// A running fault proxy (see the module docs). Dropping it stops it.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy on a free port of 127.0.0.1 forwarding to `target`, in [`Mode::Forward`].
    pub async fn start(target: SocketAddr) -> Result<FaultProxy> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), target).await
    }

    /// A proxy listening on `listen` (a loopback address; port 0 picks a free one).
    pub async fn start_on(listen: SocketAddr, target: SocketAddr) -> Result<FaultProxy> {
        anyhow::ensure!(
            listen.ip().is_loopback(),
            "the fault proxy listens on loopback only, not {listen}"
        );
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("fault proxy: binding {listen}"))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: watch::Sender::new(State::Mode(Mode::Forward)),
            target: Mutex::new(target),
            open: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FaultProxy {
            addr,
            shared,
            accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn mode(&self) -> Mode {
        match *self.shared.state.borrow() {
            State::Mode(m) => m,
            State::Closed => Mode::Reject,
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared.state.send_replace(State::Mode(mode));
    }

    /// Stop answering, holding every connection (see [`Mode::Pause`]).
    pub fn pause(&self) {
        self.set_mode(Mode::Pause);
    }

    /// Reset every connection and every new one (see [`Mode::Reject`]).
    pub fn reject(&self) {
        self.set_mode(Mode::Reject);
    }

    /// Forward again; held connections continue.
    pub fn resume(&self) {
        self.set_mode(Mode::Forward);
    }

    /// Forward new connections to `target` from now on (e.g. a restarted process on a new
    /// port); open connections keep their old target.
    pub fn set_target(&self, target: SocketAddr) {
        *self.shared.target.lock().unwrap_or_else(|e| e.into_inner()) = target;
    }

    pub fn target(&self) -> SocketAddr {
        *self.shared.target.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connections open now (client side).
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections whose target could not be reached.
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Writes a copy of `cp`'s admin kubeconfig whose server is this proxy, to `path`; a
    /// component started with it reaches kube-apiserver only through the proxy (TLS passes
    /// through untouched: the apiserver's certificate names 127.0.0.1).
    pub fn kubeconfig_for(&self, cp: &ControlPlane, path: &Path) -> Result<PathBuf> {
        let mut config = cp.kubeconfig.clone();
        for named in &mut config.clusters {
            if let Some(cluster) = named.cluster.as_mut() {
                cluster.server = Some(format!("https://{}", self.addr));
            }
        }
        std::fs::write(path, serde_yaml::to_string(&config)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path.to_path_buf())
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.state.send_replace(State::Closed);
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut state = shared.state.subscribe();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = wait_closed(&mut state) => return,
        };
        let (client, _) = match accepted {
            Ok(c) => c,
            Err(_) => {
                // EMFILE and the like: do not spin.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = client.set_nodelay(true);
        tokio::spawn(connection(client, shared.clone()));
    }
}

async fn wait_closed(state: &mut watch::Receiver<State>) {
    let _ = state.wait_for(|s| *s == State::Closed).await;
}

/// Closes with a reset (SO_LINGER 0), as a dead peer's kernel would answer.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(client: TcpStream, shared: Arc<Shared>) {
    shared.open.fetch_add(1, Ordering::Relaxed);
    let _guard = OpenGuard(shared.clone());
    let mut state = shared.state.subscribe();
    // Held while paused; reset when rejecting.
    let ready = state
        .wait_for(|s| *s != State::Mode(Mode::Pause))
        .await
        .map(|s| *s);
    if !matches!(ready, Ok(State::Mode(Mode::Forward))) {
        reset(client);
        return;
    }
    let target = *shared.target.lock().unwrap_or_else(|e| e.into_inner());
    let upstream = tokio::select! {
        c = TcpStream::connect(target) => c,
        _ = state.wait_for(|s| matches!(s, State::Closed | State::Mode(Mode::Reject))) => {
            reset(client);
            return;
        }
    };
    let upstream = match upstream {
        Ok(u) => u,
        Err(_) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            reset(client);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let up = pump(cr, uw, shared.state.subscribe());
    let down = pump(ur, cw, shared.state.subscribe());
    // Either direction ending with a fault ends both; a clean EOF half-closes only its own.
    let (a, b) = tokio::join!(up, down);
    if let (Some((r1, w1)), Some((r2, w2))) = (a, b) {
        // Both halves came back for a reset: reunite and reset both sides.
        if let (Ok(c), Ok(u)) = (r1.reunite(w2), r2.reunite(w1)) {
            reset(c);
            reset(u);
        }
    }
}

/// Copies `from` into `to` while forwarding; stops reading while paused. Returns the halves
/// when the connection must be reset (reject or proxy closed), `None` after a clean end.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<State>,
) -> Option<(
    tokio::net::tcp::OwnedReadHalf,
    tokio::net::tcp::OwnedWriteHalf,
)> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let now = *state.borrow_and_update();
        match now {
            State::Closed | State::Mode(Mode::Reject) => return Some((from, to)),
            State::Mode(Mode::Pause) => {
                if state.changed().await.is_err() {
                    return Some((from, to));
                }
                continue;
            }
            State::Mode(Mode::Forward) => {}
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return None;
                }
                Ok(n) => n,
            },
            changed = state.changed() => {
                if changed.is_err() {
                    return Some((from, to));
                }
                continue;
            }
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// An echo server on loopback; returns its address.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).await?;
        Ok(buf)
    }

    #[tokio::test]
    async fn forwards_pauses_resumes_and_rejects() {
        let proxy = FaultProxy::start(echo().await).await.expect("proxy");
        let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_eq!(roundtrip(&mut s, b"one").await.expect("forward"), b"one");

        proxy.pause();
        // Bytes sent while paused get no answer...
        let held = tokio::time::timeout(Duration::from_millis(300), roundtrip(&mut s, b"two"));
        assert!(held.await.is_err(), "a paused proxy answered");
        // ...and a new connection is accepted but not served.
        let mut fresh = TcpStream::connect(proxy.addr())
            .await
            .expect("connect while paused");
        let held = tokio::time::timeout(Duration::from_millis(300), roundtrip(&mut fresh, b"x"));
        assert!(
            held.await.is_err(),
            "a paused proxy served a new connection"
        );

        proxy.resume();
        // What was held arrives; both connections work again.
        let mut buf = [0u8; 3];
        s.read_exact(&mut buf)
            .await
            .expect("held bytes after resume");
        assert_eq!(&buf, b"two");
        let mut one = [0u8; 1];
        fresh
            .read_exact(&mut one)
            .await
            .expect("held connection after resume");
        assert_eq!(&one, b"x");

        proxy.reject();
        let mut buf = [0u8; 8];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("a rejected connection ends at once");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        let mut again = TcpStream::connect(proxy.addr())
            .await
            .expect("accepted, then reset");
        let r = tokio::time::timeout(Duration::from_secs(5), roundtrip(&mut again, b"y"))
            .await
            .expect("a rejected new connection ends at once");
        assert!(r.is_err(), "a rejecting proxy forwarded: {r:?}");

        proxy.resume();
        let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_eq!(roundtrip(&mut s, b"back").await.expect("forward"), b"back");
        assert!(proxy.accepted() >= 4);
    }

    #[tokio::test]
    async fn a_new_target_takes_new_connections() {
        let proxy = FaultProxy::start(echo().await).await.expect("proxy");
        let dead = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let dead_addr = dead.local_addr().expect("addr");
        drop(dead);
        proxy.set_target(dead_addr);
        let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert!(roundtrip(&mut s, b"z").await.is_err());
        assert_eq!(proxy.failed(), 1);
        proxy.set_target(echo().await);
        let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_eq!(roundtrip(&mut s, b"ok").await.expect("forward"), b"ok");
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_its_connections() {
        let proxy = FaultProxy::start(echo().await).await.expect("proxy");
        let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_eq!(roundtrip(&mut s, b"a").await.expect("forward"), b"a");
        drop(proxy);
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed at once");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    }
}
