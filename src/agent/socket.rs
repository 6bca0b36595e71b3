//! The DHCP socket: UDP 0.0.0.0:67 bound to the pool's interface, one task that receives,
//! decides and sends, one packet at a time (measured fast enough: docs/dhcp.md §6).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::packet::{handle, unix_now};
use super::{AgentState, stopped};

/// Receive buffer for boot storms: the default ~208 KiB holds only ~100 DHCP packets. The
/// kernel caps it at net.core.rmem_max.
const RECV_BUFFER: usize = 4 << 20;

pub fn open(nic: &str) -> anyhow::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    // Replies to clients without an address go to 255.255.255.255.
    socket.set_broadcast(true)?;
    // Only the pool's network: the node's other interfaces may have DHCP of their own.
    socket
        .bind_device(Some(nic.as_bytes()))
        .map_err(|e| anyhow::anyhow!("SO_BINDTODEVICE {nic}: {e}"))?;
    if let Err(e) = socket.set_recv_buffer_size(RECV_BUFFER) {
        tracing::warn!("cannot set a {RECV_BUFFER}-byte receive buffer: {e}");
    }
    socket.set_nonblocking(true)?;
    socket
        .bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 67).into())
        .map_err(|e| anyhow::anyhow!("bind 0.0.0.0:67: {e}"))?;
    tracing::debug!(
        recv_buffer = socket.recv_buffer_size().unwrap_or(0),
        "DHCP socket bound"
    );
    Ok(socket.into())
}

pub async fn serve(
    socket: std::net::UdpSocket,
    state: Arc<AgentState>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let socket = UdpSocket::from_std(socket)?;
    // Larger than any Ethernet frame; a longer datagram is truncated and then malformed.
    let mut buf = vec![0u8; 4096];
    let stop = stopped(stop);
    tokio::pin!(stop);
    loop {
        let (len, peer) = tokio::select! {
            _ = &mut stop => return Ok(()),
            r = socket.recv_from(&mut buf) => match r {
                Ok(received) => received,
                Err(e) => {
                    // ICMP errors from earlier sends surface here on Linux; not fatal.
                    tracing::debug!("receive: {e}");
                    continue;
                }
            },
        };
        let Some(send) = handle(&state, &buf[..len], unix_now()) else {
            continue;
        };
        if state.dry_run {
            tracing::info!(
                kind = send.kind,
                mac = %send.mac,
                yiaddr = %send.yiaddr,
                to = %send.to,
                from = %peer,
                len = send.bytes.len(),
                "dry run: reply not sent"
            );
            continue;
        }
        match socket.send_to(&send.bytes, send.to).await {
            Ok(_) => {}
            Err(e) => {
                state.metrics.drop("send_error");
                tracing::warn!(to = %send.to, "sending a DHCP {}: {e}", send.kind);
            }
        }
    }
}
