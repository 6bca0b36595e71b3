//! The pool's server IP on the agent's interface: added by the active agent, removed when
//! it steps down, announced by gratuitous ARP on takeover.
//!
//! Addresses change through `ip` (iproute2, in the image and on every node): one subprocess
//! per change, a handful per failover, is not worth a netlink dependency. The gratuitous
//! ARP is sent from a raw packet socket, so no arping binary is needed.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{Context, bail};

/// An `ip` invocation that takes longer than this is stuck (a wedged netlink): give up and
/// let the caller retry or fence.
const IP_TIMEOUT: Duration = Duration::from_secs(2);

/// The address the active agent holds: the pool's server IP with the pool's prefix, so
/// that the connected route reaches renewing clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerAddr {
    pub ip: Ipv4Addr,
    pub prefix: u8,
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

async fn ip(args: &[&str]) -> anyhow::Result<std::process::Output> {
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(args).kill_on_drop(true);
    match tokio::time::timeout(IP_TIMEOUT, cmd.output()).await {
        Ok(out) => out.context("running `ip` (iproute2 must be installed for --manage-server-ip)"),
        Err(_) => bail!("`ip {}` did not finish in {IP_TIMEOUT:?}", args.join(" ")),
    }
}

/// Adds `addr` to `nic`; already present is success.
pub async fn add(nic: &str, addr: ServerAddr) -> anyhow::Result<()> {
    let cidr = addr.to_string();
    let out = ip(&["-4", "addr", "add", &cidr, "dev", nic]).await?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || err.contains("File exists") {
        return Ok(());
    }
    bail!(
        "adding the server IP {cidr} to {nic} failed: {}; the agent needs CAP_NET_ADMIN in the pod's network namespace",
        err.trim()
    )
}

/// Removes `ip` from `nic`, whatever its prefix; already absent is success.
pub async fn remove(nic: &str, addr: Ipv4Addr) -> anyhow::Result<()> {
    let Some(prefix) = prefix_on(nic, addr).await? else {
        return Ok(());
    };
    let cidr = format!("{addr}/{prefix}");
    let out = ip(&["-4", "addr", "del", &cidr, "dev", nic]).await?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || err.contains("Cannot assign requested address") {
        return Ok(());
    }
    bail!(
        "removing the server IP {cidr} from {nic} failed: {}; the agent needs CAP_NET_ADMIN in the pod's network namespace",
        err.trim()
    )
}

/// The prefix `addr` has on `nic`, if it is configured there.
pub async fn prefix_on(nic: &str, addr: Ipv4Addr) -> anyhow::Result<Option<u8>> {
    let out = ip(&["-4", "-o", "addr", "show", "dev", nic]).await?;
    if !out.status.success() {
        bail!(
            "listing the addresses of {nic}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(parse_prefix(&String::from_utf8_lossy(&out.stdout), addr))
}

/// Finds `inet <addr>/<prefix>` in `ip -o addr show` output.
fn parse_prefix(text: &str, addr: Ipv4Addr) -> Option<u8> {
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w != "inet" {
            continue;
        }
        let (ip, prefix) = words.next()?.split_once('/')?;
        if ip.parse::<Ipv4Addr>().ok() == Some(addr) {
            return prefix.parse().ok();
        }
    }
    None
}

const ETH_P_ARP: u16 = 0x0806;

/// An ARP announcement (RFC 5227 §3: a request with sender = target = `ip`) and the reply
/// form some older stacks only honour, both broadcast.
fn garp_frames(mac: [u8; 6], ip: Ipv4Addr) -> [[u8; 42]; 2] {
    let mut frames = [[0u8; 42]; 2];
    for (frame, op) in frames.iter_mut().zip([1u8, 2u8]) {
        frame[0..6].copy_from_slice(&[0xff; 6]);
        frame[6..12].copy_from_slice(&mac);
        frame[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
        // Ethernet, IPv4, 6-byte and 4-byte addresses.
        frame[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, op]);
        frame[22..28].copy_from_slice(&mac);
        frame[28..32].copy_from_slice(&ip.octets());
        let target_mac = if op == 2 { [0xff; 6] } else { [0; 6] };
        frame[32..38].copy_from_slice(&target_mac);
        frame[38..42].copy_from_slice(&ip.octets());
    }
    frames
}

/// Sends gratuitous ARP for `ip` out of `nic`, so that neighbours (VMs renewing by unicast,
/// the router) replace the previous holder's MAC at once instead of when their entry ages.
pub fn gratuitous_arp(nic: &str, ip: Ipv4Addr) -> anyhow::Result<()> {
    let name = std::ffi::CString::new(nic).context("interface name contains a NUL byte")?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("interface {nic}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if raw < 0 {
        bail!(
            "opening a packet socket for gratuitous ARP: {} (needs CAP_NET_RAW)",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mac = hardware_address(&fd, nic, &name)?;
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = ETH_P_ARP.to_be();
    to.sll_ifindex = ifindex as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    for frame in garp_frames(mac, ip) {
        // SAFETY: the buffer and address are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const to).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent < 0 {
            bail!(
                "sending gratuitous ARP for {ip} on {nic}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

fn hardware_address(fd: &OwnedFd, nic: &str, name: &std::ffi::CStr) -> anyhow::Result<[u8; 6]> {
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.to_bytes();
    if bytes.len() >= req.ifr_name.len() {
        bail!("interface name {nic} is too long");
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills the union's hwaddr member of a valid ifreq.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &raw mut req) };
    if rc < 0 {
        bail!(
            "reading the MAC address of {nic}: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: after SIOCGIFHWADDR the hwaddr member is the one written.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(data.iter()) {
        *dst = *src as u8;
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_prefix_in_ip_output() {
        let text = "5: eth1    inet 192.168.48.10/24 brd 192.168.48.255 scope global eth1\\       valid_lft forever preferred_lft forever\n\
                    5: eth1    inet 192.168.48.77/24 scope global secondary eth1\\       valid_lft forever preferred_lft forever\n";
        assert_eq!(
            parse_prefix(text, Ipv4Addr::new(192, 168, 48, 77)),
            Some(24)
        );
        assert_eq!(parse_prefix(text, Ipv4Addr::new(192, 168, 48, 7)), None);
        assert_eq!(parse_prefix("", Ipv4Addr::new(192, 168, 48, 77)), None);
    }

    #[test]
    fn garp_frames_announce_the_address() {
        let mac = [2, 0, 0, 0, 0, 9];
        let [request, reply] = garp_frames(mac, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(&request[12..14], &[8, 6]);
        assert_eq!(&request[20..22], &[0, 1]);
        assert_eq!(&reply[20..22], &[0, 2]);
        // Sender and target protocol addresses are both ours.
        assert_eq!(&request[28..32], &[10, 0, 0, 1]);
        assert_eq!(&request[38..42], &[10, 0, 0, 1]);
        assert_eq!(&request[22..28], &mac);
    }
}
