//! Where the agent's HTTP server listens: never on the VM network.
//!
//! The lease view tells whoever reads it every MAC and address of the pool; the guests on
//! the pool's network (`--nic`) must not reach it. So the server listens on loopback and on
//! the pod's address (the pod network, where the aggregated apiserver and the kubelet's
//! probes come from), never on a wildcard address:
//!
//! - `--http-addr <ip:port>` given: exactly that, refused if it is a wildcard (`0.0.0.0`,
//!   `::`) or an address of `--nic`;
//! - otherwise 127.0.0.1:8080 plus `<pod IP>:8080`, the pod IP being `--pod-ip` (`POD_IP`,
//!   from the downward API's `status.podIP`) or, without it, the IPv4 address of the
//!   interface that holds the default route, when that interface is not `--nic`.
//!
//! The pod address's listener is also bound to its interface (SO_BINDTODEVICE): with
//! Linux's weak host model a packet for the pod IP arriving on `--nic` would otherwise be
//! accepted, and a guest could reach the port by routing through the agent.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, bail};
use socket2::{Domain, Protocol, Socket, Type};

/// The agent's HTTP port when `--http-addr` is not given.
pub const DEFAULT_PORT: u16 = 8080;

/// One address to listen on, and the interface to pin it to (none for loopback or when the
/// address's interface is unknown).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listen {
    pub addr: SocketAddr,
    pub device: Option<String>,
}

/// The interface addresses of this network namespace: (interface, address).
pub fn interface_addrs() -> Vec<(String, IpAddr)> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below; we only read it.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr is non-null; its family says which sockaddr it is.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let addr = match family {
            libc::AF_INET => {
                // SAFETY: AF_INET means a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
            }
            libc::AF_INET6 => {
                // SAFETY: AF_INET6 means a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::V6(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr))
            }
            _ => continue,
        };
        out.push((name, addr));
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// The interface of the IPv4 default route in `/proc/net/route`'s text (the first one with
/// the lowest metric).
pub fn default_route_interface(route_table: &str) -> Option<String> {
    route_table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            if f.len() < 8 || f[1] != "00000000" || f[7] != "00000000" {
                return None;
            }
            let flags = u32::from_str_radix(f[3], 16).ok()?;
            // RTF_UP
            if flags & 0x1 == 0 {
                return None;
            }
            let metric: u32 = f[6].parse().ok()?;
            Some((metric, f[0].to_string()))
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, iface)| iface)
}

/// What to listen on (pure; see the module docs). `addrs` are this namespace's interface
/// addresses, `default_iface` the default route's interface.
pub fn decide(
    explicit: Option<SocketAddr>,
    pod_ip: Option<IpAddr>,
    nic: &str,
    addrs: &[(String, IpAddr)],
    default_iface: Option<&str>,
) -> anyhow::Result<(Vec<Listen>, Option<String>)> {
    let iface_of = |ip: IpAddr| {
        addrs
            .iter()
            .find(|(_, a)| *a == ip)
            .map(|(name, _)| name.clone())
    };
    if let Some(addr) = explicit {
        if addr.ip().is_unspecified() {
            bail!(
                "--http-addr {addr} would listen on every interface, the VM network ({nic}) too: \
                 give the pod's address (or leave --http-addr out: loopback plus the pod IP)"
            );
        }
        let device = iface_of(addr.ip());
        if device.as_deref() == Some(nic) {
            bail!("--http-addr {addr} is an address of {nic}, the VM network the agent serves");
        }
        let device = device.filter(|_| !addr.ip().is_loopback());
        return Ok((vec![Listen { addr, device }], None));
    }
    let loopback = Listen {
        addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_PORT),
        device: None,
    };
    if let Some(ip) = pod_ip {
        if ip.is_unspecified() || ip.is_loopback() {
            bail!("--pod-ip (POD_IP) {ip} is not a pod address");
        }
        let device = iface_of(ip);
        if device.as_deref() == Some(nic) {
            bail!("--pod-ip (POD_IP) {ip} is an address of {nic}, the VM network the agent serves");
        }
        let pod = Listen {
            addr: SocketAddr::new(ip, DEFAULT_PORT),
            device,
        };
        return Ok((vec![loopback, pod], None));
    }
    let Some(iface) = default_iface else {
        return Ok((
            vec![loopback],
            Some("no default route and no --pod-ip (POD_IP): HTTP on 127.0.0.1 only".into()),
        ));
    };
    if iface == nic {
        return Ok((
            vec![loopback],
            Some(format!(
                "the default route is on {nic}, the VM network: HTTP on 127.0.0.1 only (give --pod-ip or --http-addr)"
            )),
        ));
    }
    let Some(ip) = addrs
        .iter()
        .find(|(name, a)| name == iface && a.is_ipv4())
        .map(|(_, a)| *a)
    else {
        return Ok((
            vec![loopback],
            Some(format!(
                "the default route's interface {iface} has no IPv4 address: HTTP on 127.0.0.1 only"
            )),
        ));
    };
    let pod = Listen {
        addr: SocketAddr::new(ip, DEFAULT_PORT),
        device: Some(iface.to_string()),
    };
    Ok((vec![loopback, pod], None))
}

/// Decides from this namespace's interfaces and routes.
pub fn listen_addrs(
    explicit: Option<SocketAddr>,
    pod_ip: Option<IpAddr>,
    nic: &str,
) -> anyhow::Result<Vec<Listen>> {
    let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let default_iface = default_route_interface(&routes);
    let (listen, warning) = decide(
        explicit,
        pod_ip,
        nic,
        &interface_addrs(),
        default_iface.as_deref(),
    )?;
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    Ok(listen)
}

/// A listener on `l.addr`, pinned to `l.device` when there is one (a failure to pin, e.g.
/// without CAP_NET_RAW, is logged: the address alone still keeps it off --nic's address).
pub fn bind(l: &Listen) -> anyhow::Result<tokio::net::TcpListener> {
    let domain = if l.addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if let Some(dev) = &l.device
        && let Err(e) = socket.bind_device(Some(dev.as_bytes()))
    {
        tracing::warn!(
            "cannot pin the HTTP listener {} to {dev} (SO_BINDTODEVICE: {e}); bound by address only",
            l.addr
        );
    }
    socket
        .bind(&l.addr.into())
        .with_context(|| format!("binding the HTTP server to {}", l.addr))?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(tokio::net::TcpListener::from_std(socket.into())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        eth1\t0030A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
        eth0\t00000000\t0100FE0A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
        eth0\t0000FE0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";

    fn addrs() -> Vec<(String, IpAddr)> {
        vec![
            ("lo".into(), "127.0.0.1".parse().expect("ip")),
            ("eth0".into(), "10.254.0.2".parse().expect("ip")),
            ("eth1".into(), "192.168.48.2".parse().expect("ip")),
        ]
    }

    #[test]
    fn the_default_route_names_its_interface() {
        assert_eq!(default_route_interface(ROUTES).as_deref(), Some("eth0"));
        assert_eq!(default_route_interface("Iface\tDestination\n"), None);
    }

    #[test]
    fn by_default_loopback_and_the_default_routes_address_never_the_nic() {
        let (l, warn) = decide(None, None, "eth1", &addrs(), Some("eth0")).expect("decide");
        assert_eq!(warn, None);
        assert_eq!(
            l,
            vec![
                Listen {
                    addr: "127.0.0.1:8080".parse().expect("addr"),
                    device: None
                },
                Listen {
                    addr: "10.254.0.2:8080".parse().expect("addr"),
                    device: Some("eth0".into())
                },
            ]
        );
        // The default route on the VM network: loopback only, with a warning.
        let (l, warn) = decide(None, None, "eth1", &addrs(), Some("eth1")).expect("decide");
        assert_eq!(l.len(), 1);
        assert!(l[0].addr.ip().is_loopback());
        assert!(warn.is_some());
    }

    #[test]
    fn the_pod_ip_wins_and_must_not_be_on_the_nic() {
        let pod = Some("10.254.0.2".parse().expect("ip"));
        let (l, _) = decide(None, pod, "eth1", &addrs(), Some("eth1")).expect("decide");
        assert_eq!(l[1].addr, "10.254.0.2:8080".parse().expect("addr"));
        assert_eq!(l[1].device.as_deref(), Some("eth0"));
        let on_nic = Some("192.168.48.2".parse().expect("ip"));
        assert!(decide(None, on_nic, "eth1", &addrs(), Some("eth0")).is_err());
    }

    #[test]
    fn wildcards_and_nic_addresses_are_refused() {
        for bad in ["0.0.0.0:8080", "[::]:8080", "192.168.48.2:8080"] {
            let addr = bad.parse().expect("addr");
            assert!(
                decide(Some(addr), None, "eth1", &addrs(), Some("eth0")).is_err(),
                "{bad} was accepted"
            );
        }
        let (l, _) = decide(
            Some("127.0.0.1:9000".parse().expect("addr")),
            None,
            "eth1",
            &addrs(),
            None,
        )
        .expect("loopback is fine");
        assert_eq!(l[0].device, None);
    }
}
