//! Creating a shard's UDP sockets with our own options (socket2), then handing them to glommio.
//! This is the crate's only `unsafe`.

use std::{
    io,
    net::SocketAddr,
    os::fd::{FromRawFd, IntoRawFd},
};

use socket2::{Domain, Protocol, Socket, Type};

/// Binds a UDP socket on `addr` with SO_REUSEPORT (so every shard binds the same port and the
/// kernel spreads datagrams by 4-tuple) and SO_RCVBUF = `recv_buffer_bytes`.
///
/// Must run on the shard's executor thread: glommio ties the socket to the current reactor.
pub(crate) fn bind_udp(
    addr: SocketAddr,
    recv_buffer_bytes: usize,
) -> io::Result<glommio::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    socket.set_recv_buffer_size(recv_buffer_bytes)?;
    // Linux reports twice what it granted (bookkeeping overhead) and caps at net.core.rmem_max.
    let granted = socket.recv_buffer_size()? / 2;
    if granted < recv_buffer_bytes {
        tracing::warn!(
            wanted = recv_buffer_bytes,
            granted,
            "UDP receive buffer capped by the kernel; raise net.core.rmem_max to avoid drops in bursts"
        );
    }
    socket.bind(&addr.into())?;
    let fd = socket.into_raw_fd();
    // SAFETY: `into_raw_fd` just released `fd`: it is an open UDP socket that nothing else owns
    // or will close. The glommio socket takes sole ownership and closes it when dropped.
    #[allow(unsafe_code)]
    let socket = unsafe { glommio::net::UdpSocket::from_raw_fd(fd) };
    Ok(socket)
}
