//! Creating a shard's UDP sockets and its media streams listener with our own options
//! (socket2), then handing them to glommio, and the synchronous send path. This is the crate's
//! only `unsafe`.
//!
//! Each socket is two file descriptors on one kernel socket: glommio owns one for receiving
//! (io_uring, awaited by a task that is never dropped mid-receive except when the socket
//! goes), and the shard keeps a socket2 duplicate for sending. glommio 0.9's `send_to` takes
//! one `&[u8]` and, when the non-blocking attempt fails, copies it into a DMA buffer it
//! allocates; it has no vectored send. Sending with `sendmsg(MSG_DONTWAIT)` on the duplicate
//! gives a two-entry iovec (RTP header + the shared clip's frame, no payload copy, no
//! allocation) and no `.await` while the shard's state is borrowed. A full send buffer
//! (`EAGAIN`) drops that datagram, as the network would: RTP is loss-tolerant and SIP
//! retransmits.

use std::{
    io::{self, IoSlice},
    net::SocketAddr,
    os::fd::{FromRawFd, IntoRawFd},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// A bound UDP socket: the glommio half receives, the socket2 half sends.
#[derive(Debug)]
pub(crate) struct UdpPair {
    pub(crate) recv: glommio::net::UdpSocket,
    pub(crate) send: Socket,
    pub(crate) local: SocketAddr,
}

/// Binds a UDP socket on `addr` with SO_REUSEPORT (so every shard binds the same port and the
/// kernel spreads datagrams by 4-tuple) and SO_RCVBUF = `recv_buffer_bytes`.
///
/// Must run on the shard's executor thread: glommio ties the socket to the current reactor.
pub(crate) fn bind_udp(addr: SocketAddr, recv_buffer_bytes: usize) -> io::Result<UdpPair> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    socket.set_recv_buffer_size(recv_buffer_bytes)?;
    // Linux reports twice what it granted (bookkeeping overhead) and caps at net.core.rmem_max.
    let mut granted = socket.recv_buffer_size()? / 2;
    if granted < recv_buffer_bytes {
        // With CAP_NET_ADMIN (root, or the systemd unit's capability) the cap does not apply.
        let wanted = libc::c_int::try_from(recv_buffer_bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: a valid socket and a c_int option value that lives for the call.
        #[allow(unsafe_code)]
        let forced = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&wanted as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if forced == 0 {
            granted = socket.recv_buffer_size()? / 2;
        }
    }
    if granted < recv_buffer_bytes {
        tracing::warn!(
            wanted = recv_buffer_bytes,
            granted,
            "UDP receive buffer capped by the kernel; raise net.core.rmem_max to avoid drops in bursts"
        );
    }
    socket.bind(&addr.into())?;
    into_pair(socket)
}

/// Binds an RTP socket on `addr`, without SO_REUSEPORT: a port another process holds must
/// fail here so the allocator tries the next one.
pub(crate) fn bind_rtp(addr: SocketAddr) -> io::Result<UdpPair> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.bind(&addr.into())?;
    into_pair(socket)
}

fn into_pair(socket: Socket) -> io::Result<UdpPair> {
    let local = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("UDP socket without an IP address"))?;
    let send = socket.try_clone()?;
    let fd = socket.into_raw_fd();
    // SAFETY: `into_raw_fd` just released `fd`: it is an open UDP socket that nothing else owns
    // or will close. The glommio socket takes sole ownership and closes it when dropped.
    #[allow(unsafe_code)]
    let recv = unsafe { glommio::net::UdpSocket::from_raw_fd(fd) };
    Ok(UdpPair { recv, send, local })
}

/// The media streams listener on `addr`: SO_REUSEPORT (every shard binds the same port and the
/// kernel spreads connections) and SO_SNDBUF = `send_buffer_bytes`, which the accepted
/// connections inherit. A small send buffer bounds what a slow peer can make the kernel hold
/// (by default it grows to `net.ipv4.tcp_wmem`'s maximum, 4 MiB: minutes of audio), so the
/// connection's own bounded queue, and its drop count, take over within seconds.
///
/// Must run on the shard's executor thread: glommio ties the socket to the current reactor.
pub(crate) fn bind_tcp_listener(
    addr: SocketAddr,
    send_buffer_bytes: usize,
) -> io::Result<glommio::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_send_buffer_size(send_buffer_bytes)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    let fd = socket.into_raw_fd();
    // SAFETY: `into_raw_fd` just released `fd`: a listening TCP socket that nothing else owns
    // or will close. The glommio listener takes sole ownership and closes it when dropped.
    #[allow(unsafe_code)]
    let listener = unsafe { glommio::net::TcpListener::from_raw_fd(fd) };
    Ok(listener)
}

/// Sends one datagram made of `parts` to `dest` without blocking and without copying the
/// parts in user space.
pub(crate) fn send_parts(
    socket: &Socket,
    parts: &[IoSlice<'_>],
    dest: SocketAddr,
) -> io::Result<usize> {
    socket.send_to_vectored_with_flags(parts, &SockAddr::from(dest), libc::MSG_DONTWAIT)
}
