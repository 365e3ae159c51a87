//! Creating a shard's UDP sockets and its media streams listener with our own options
//! (socket2), then handing them to glommio, and the synchronous send path. This is the crate's
//! only `unsafe`.
//!
//! A SIP socket is two file descriptors on one kernel socket: glommio owns one for receiving
//! (its io_uring `peek_from` awaits a datagram, by a task that is never dropped mid-receive
//! except when the socket goes; a [`SipBatch`] then takes what is queued), and the shard
//! keeps a socket2 duplicate for sending. A call's RTP socket is one
//! descriptor glommio never sees ([`RtpSocket`]): the shard sends on it and drains it with
//! `recvmmsg` at the call's media-clock ticks. glommio 0.9's `send_to` takes
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
/// kernel spreads datagrams by 4-tuple), SO_RCVBUF = `recv_buffer_bytes` and each datagram's
/// arrival time ([`stamp_arrivals`]).
///
/// Must run on the shard's executor thread: glommio ties the socket to the current reactor.
pub(crate) fn bind_udp(addr: SocketAddr, recv_buffer_bytes: usize) -> io::Result<UdpPair> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    if let Err(e) = stamp_arrivals(&socket) {
        // Admission's lag reading then counts only the inbox's wait (see `SipBatch`).
        tracing::warn!(error = %e, "SIP socket without arrival times (SO_TIMESTAMPNS)");
    }
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

/// A call's RTP socket: one file descriptor, never handed to glommio. The shard sends on it
/// and drains it with [`RecvBatch::recv`] at each of the call's media-clock ticks, so a
/// received packet costs no io_uring operation, no wake-up and no allocation.
#[derive(Debug)]
pub(crate) struct RtpSocket {
    pub(crate) socket: Socket,
    pub(crate) local: SocketAddr,
}

/// Binds an RTP socket on `addr`, without SO_REUSEPORT: a port another process holds must
/// fail here so the allocator tries the next one.
pub(crate) fn bind_rtp(addr: SocketAddr) -> io::Result<RtpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.bind(&addr.into())?;
    let local = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("UDP socket without an IP address"))?;
    Ok(RtpSocket { socket, local })
}

/// Packets one RTP drain takes at most: a call gets one packet per 20 ms tick, so a few cover
/// a late tick; what stays queued is taken at the next.
pub(crate) const RECV_BATCH: usize = 8;

/// Bytes kept of each received RTP datagram (RTP over UDP from a trunk is far smaller; a
/// larger one is cut, and its RTP check fails).
pub(crate) const RECV_DATAGRAM: usize = 2048;

/// Datagrams one `recvmmsg` takes from a SIP socket at most (then the shard's loop runs).
pub(crate) const SIP_BATCH: usize = 16;

/// The largest UDP datagram (a SIP message over UDP is normally far smaller).
pub(crate) const SIP_DATAGRAM: usize = 64 * 1024;

/// The `recvmmsg` of one shard's RTP drains: [`RECV_BATCH`] datagrams of [`RECV_DATAGRAM`].
pub(crate) type RtpBatch = RecvBatch<RECV_BATCH>;

/// The `recvmmsg` of one SIP socket: [`SIP_BATCH`] datagrams of [`SIP_DATAGRAM`].
pub(crate) type SipBatch = RecvBatch<SIP_BATCH>;

/// Room for one `SCM_TIMESTAMPNS` control message (`CMSG_SPACE(sizeof(timespec))` is 32 on
/// 64-bit Linux), in `u64`s so that it is aligned for `cmsghdr`.
const CONTROL_WORDS: usize = 8;

/// The buffers of a `recvmmsg` of up to `N` datagrams, reused for every receive: no
/// allocation per datagram. With `SO_TIMESTAMPNS` on the socket ([`stamp_arrivals`]) each
/// datagram also gets the kernel's arrival time.
pub(crate) struct RecvBatch<const N: usize> {
    /// `N` slots of `len` bytes each, one after the other.
    bufs: Box<[u8]>,
    len: usize,
    lens: [usize; N],
    from: [Option<SocketAddr>; N],
    /// When the kernel queued each datagram (wall clock, since the Unix epoch), if it said.
    arrived: [Option<std::time::Duration>; N],
    control: Box<[[u64; CONTROL_WORDS]; N]>,
}

impl<const N: usize> std::fmt::Debug for RecvBatch<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch").field("len", &self.len).finish_non_exhaustive()
    }
}

impl<const N: usize> RecvBatch<N> {
    /// Buffers for `N` datagrams of up to `len` bytes each (a longer one is cut to `len`).
    pub(crate) fn new(len: usize) -> Self {
        let len = len.max(1);
        Self {
            bufs: vec![0; N * len].into_boxed_slice(),
            len,
            lens: [0; N],
            from: [None; N],
            arrived: [None; N],
            control: Box::new([[0; CONTROL_WORDS]; N]),
        }
    }

    /// Takes what `socket` holds now, up to `N` datagrams, in one `recvmmsg` without waiting;
    /// returns how many (0 when none is queued).
    pub(crate) fn recv(&mut self, socket: &impl std::os::fd::AsRawFd) -> io::Result<usize> {
        // SAFETY: zeroed `sockaddr_storage`, `iovec` and `mmsghdr` are valid values (plain C
        // structs of integers and pointers).
        #[allow(unsafe_code)]
        let (mut addrs, mut iovs, mut hdrs): (
            [libc::sockaddr_storage; N],
            [libc::iovec; N],
            [libc::mmsghdr; N],
        ) = unsafe { std::mem::zeroed() };
        for (i, slot) in self.bufs.chunks_exact_mut(self.len).enumerate().take(N) {
            iovs[i].iov_base = slot.as_mut_ptr().cast();
            iovs[i].iov_len = self.len;
            hdrs[i].msg_hdr.msg_name = (&raw mut addrs[i]).cast();
            hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            hdrs[i].msg_hdr.msg_iov = &raw mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
            hdrs[i].msg_hdr.msg_control = self.control[i].as_mut_ptr().cast();
            hdrs[i].msg_hdr.msg_controllen = std::mem::size_of::<[u64; CONTROL_WORDS]>();
        }
        // SAFETY: every pointer in `hdrs` points into `addrs`, `iovs`, `self.bufs` and
        // `self.control`, which outlive the call, with the lengths given; `recvmmsg` writes
        // only within them.
        #[allow(unsafe_code)]
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                hdrs.as_mut_ptr(),
                N as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        let Ok(n) = usize::try_from(n) else {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(err),
            };
        };
        let n = n.min(N);
        for i in 0..n {
            self.lens[i] = (hdrs[i].msg_len as usize).min(self.len);
            self.from[i] = socket_addr(&addrs[i]);
            self.arrived[i] = kernel_arrival(&hdrs[i].msg_hdr);
        }
        Ok(n)
    }

    /// Datagram `i` of the last [`RecvBatch::recv`] and where it came from.
    pub(crate) fn get(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        let from = (*self.from.get(i)?)?;
        let start = i * self.len;
        Some((&self.bufs[start..start + self.lens[i]], from))
    }

    /// When the kernel queued datagram `i` of the last receive (wall clock since the Unix
    /// epoch), if the socket stamps arrivals.
    pub(crate) fn arrived(&self, i: usize) -> Option<std::time::Duration> {
        *self.arrived.get(i)?
    }
}

/// Asks the kernel to stamp each datagram `socket` receives with its arrival time
/// (`SO_TIMESTAMPNS`), read by [`RecvBatch::arrived`].
pub(crate) fn stamp_arrivals(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket, and an option value that lives for the call.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// The instant the kernel received a datagram read at `now` (`wall` on the system clock),
/// from its arrival stamp; `now` without one, or when the system clock stepped back.
pub(crate) fn arrival(
    now: std::time::Instant,
    wall: std::time::SystemTime,
    stamp: Option<std::time::Duration>,
) -> std::time::Instant {
    let waited = stamp
        .and_then(|at| wall.duration_since(std::time::UNIX_EPOCH).ok()?.checked_sub(at))
        .unwrap_or(std::time::Duration::ZERO);
    now.checked_sub(waited).unwrap_or(now)
}

/// The `SCM_TIMESTAMPNS` of a received message, if the kernel wrote one.
fn kernel_arrival(hdr: &libc::msghdr) -> Option<std::time::Duration> {
    // SAFETY: the kernel filled `hdr`'s control buffer (its `msg_controllen` says how much)
    // for this message; the CMSG macros walk only within it.
    #[allow(unsafe_code)]
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                let secs = u64::try_from(ts.tv_sec).ok()?;
                let nanos = u32::try_from(ts.tv_nsec).ok()?;
                return Some(std::time::Duration::new(secs, nanos));
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    None
}

/// The address the kernel wrote into `storage` (IPv4 or IPv6).
fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a `sockaddr_in`, which it is large and
            // aligned enough for.
            #[allow(unsafe_code)]
            let sin = unsafe { &*(std::ptr::from_ref(storage).cast::<libc::sockaddr_in>()) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for `sockaddr_in6`.
            #[allow(unsafe_code)]
            let sin6 = unsafe { &*(std::ptr::from_ref(storage).cast::<libc::sockaddr_in6>()) };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
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

/// `SO_MEMINFO` (asm-generic/socket.h; the libc crate does not name it), and the number of
/// values it fills (`SK_MEMINFO_VARS`, linux/sock_diag.h).
const SO_MEMINFO: libc::c_int = 55;
const SK_MEMINFO_VARS: usize = 9;

/// How full `socket`'s receive queue is, in percent of its buffer: the datagrams the kernel
/// holds that the shard has not read yet. `None` where the kernel does not tell.
pub(crate) fn receive_queue_percent(socket: &Socket) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut info = [0u32; SK_MEMINFO_VARS];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: a valid socket, and a buffer of `len` bytes that lives for the call.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    let alloc = info[libc::SK_MEMINFO_RMEM_ALLOC as usize];
    let buffer = info[libc::SK_MEMINFO_RCVBUF as usize];
    (rc == 0 && buffer > 0).then(|| (u64::from(alloc) * 100 / u64::from(buffer)) as u32)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(batch: &mut RtpBatch, socket: &Socket) -> Vec<(Vec<u8>, SocketAddr)> {
        let n = batch.recv(socket).unwrap();
        (0..n).filter_map(|i| batch.get(i).map(|(d, from)| (d.to_vec(), from))).collect()
    }

    #[test]
    fn a_batch_takes_what_is_queued_without_waiting_and_names_each_source() {
        for ip in ["127.0.0.1", "::1"] {
            let rtp = match bind_rtp(SocketAddr::new(ip.parse().unwrap(), 0)) {
                Ok(rtp) => rtp,
                // Only IPv6 may be missing (a host without `::1`); IPv4 must be tested.
                Err(e) if ip == "::1" => {
                    eprintln!("no IPv6 loopback here ({e}): IPv4 only");
                    continue;
                }
                Err(e) => panic!("binding {ip}: {e}"),
            };
            let mut batch = RtpBatch::new(RECV_DATAGRAM);
            // Nothing queued: no packet, and no wait.
            assert!(drained(&mut batch, &rtp.socket).is_empty());
            let peer = std::net::UdpSocket::bind(SocketAddr::new(ip.parse().unwrap(), 0)).unwrap();
            let total = RECV_BATCH + 3;
            for i in 0..total {
                peer.send_to(&[i as u8; 172], rtp.local).unwrap();
            }
            let from = peer.local_addr().unwrap();
            let mut got = Vec::new();
            // Loopback queues a datagram before `send_to` returns; poll all the same.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while got.len() < total && std::time::Instant::now() < deadline {
                got.extend(drained(&mut batch, &rtp.socket));
            }
            assert_eq!(got.len(), total, "{ip}: every datagram, over two batches");
            for (i, (data, src)) in got.iter().enumerate() {
                assert_eq!((data.as_slice(), *src), (&[i as u8; 172][..], from), "{ip} #{i}");
            }
            assert!(batch.get(RECV_BATCH).is_none());
        }
    }

    #[test]
    fn a_stamped_socket_tells_when_each_datagram_arrived_and_a_plain_one_does_not() {
        let since_epoch =
            || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        for stamped in [true, false] {
            let rtp = bind_rtp("127.0.0.1:0".parse().unwrap()).unwrap();
            if stamped {
                stamp_arrivals(&rtp.socket).unwrap();
            }
            let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let before = since_epoch();
            for i in 0..3u8 {
                peer.send_to(&[i; 40], rtp.local).unwrap();
            }
            let mut batch = SipBatch::new(SIP_DATAGRAM);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let mut n = 0;
            while n < 3 && std::time::Instant::now() < deadline {
                n = batch.recv(&rtp.socket).unwrap();
            }
            assert_eq!(n, 3, "all three in one batch");
            let after = since_epoch();
            for i in 0..3 {
                assert_eq!(batch.get(i).map(|(d, _)| d.to_vec()), Some(vec![i as u8; 40]));
                match batch.arrived(i) {
                    // The kernel's clock and ours are one (CLOCK_REALTIME): the stamp lies
                    // between the first send and the read.
                    Some(at) => assert!(stamped && before <= at && at <= after, "#{i}: {at:?}"),
                    None => assert!(!stamped, "#{i}: the stamped socket gave no time"),
                }
            }
        }
    }

    #[test]
    fn an_arrival_stamp_becomes_an_instant_that_waited_as_long() {
        use std::time::{Duration, Instant, UNIX_EPOCH};
        let now = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let stamp = |ms: u64| Some(Duration::from_secs(1_800_000_000) - Duration::from_millis(ms));
        assert_eq!(arrival(now, wall, stamp(30)), now - Duration::from_millis(30));
        assert_eq!(arrival(now, wall, stamp(0)), now);
        assert_eq!(arrival(now, wall, None), now, "no stamp: read as it arrived");
        let later = Some(Duration::from_secs(1_800_000_001));
        assert_eq!(arrival(now, wall, later), now, "the system clock stepped back");
    }

    #[test]
    fn the_receive_queue_reading_follows_unread_datagrams() {
        let rtp = bind_rtp("127.0.0.1:0".parse().unwrap()).unwrap();
        rtp.socket.set_recv_buffer_size(64 * 1024).unwrap();
        assert_eq!(receive_queue_percent(&rtp.socket), Some(0));
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..20 {
            peer.send_to(&[0u8; 1000], rtp.local).unwrap();
        }
        let full = receive_queue_percent(&rtp.socket).unwrap();
        assert!(full > 0 && full <= 100, "{full} %");
        let mut batch = RtpBatch::new(RECV_DATAGRAM);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while receive_queue_percent(&rtp.socket) != Some(0) && std::time::Instant::now() < deadline
        {
            batch.recv(&rtp.socket).unwrap();
        }
        assert_eq!(receive_queue_percent(&rtp.socket), Some(0), "read: nothing queued");
    }

    #[test]
    fn a_datagram_longer_than_the_buffer_is_cut_to_it() {
        let rtp = bind_rtp("127.0.0.1:0".parse().unwrap()).unwrap();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.send_to(&vec![7u8; RECV_DATAGRAM + 100], rtp.local).unwrap();
        let mut batch = RtpBatch::new(RECV_DATAGRAM);
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.is_empty() && std::time::Instant::now() < deadline {
            got = drained(&mut batch, &rtp.socket);
        }
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.len(), RECV_DATAGRAM);
    }
}
