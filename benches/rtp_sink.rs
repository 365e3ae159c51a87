//! `rtp_sink`: the far end of many RTP streams at once, for benches/carrier_held.py.
//!
//! Binds one UDP socket, prints `port N` on stdout, and receives with `recvmmsg` (64 datagrams
//! per call, only the RTP header kept) until its standard input closes; then prints one line
//! of figures. Arrival times are the kernel's (`SO_TIMESTAMPNS`), so the receiver's own
//! scheduling does not show in them: what is measured is when each packet reached the socket.
//!
//! Per stream (SSRC): packets, frames lost (sequence gaps), and the deviation of each
//! inter-arrival time from 20 ms, over every stream (10 µs buckets).
//!
//! With `--echo` every packet is also sent straight back to where it came from (`sendmmsg`,
//! one call per received batch), so each call has two-way RTP as a real caller's does: the
//! engine then receives a packet per call every 20 ms too.
//!
//!     rtp_sink [BIND_ADDR] [--echo]     (default 127.0.0.1:0)

#![allow(clippy::print_stdout)] // a command-line tool: stdout is its output

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

const BATCH: usize = 64;
/// Bytes kept of each packet: a 20 ms G.711 frame with its header (172) fits, for the echo.
const KEEP: usize = 256;
const BUCKET_NS: i64 = 10_000;
const BUCKETS: usize = 20_000; // 200 ms of deviation; the rest in the last bucket

#[derive(Default)]
struct Stream {
    last_seq: u16,
    last_ns: i64,
    packets: u64,
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let echo = args.iter().any(|a| a == "--echo");
    let bind = args.iter().find(|a| !a.starts_with("--")).cloned();
    let bind = bind.unwrap_or_else(|| "127.0.0.1:0".into());
    let sock = UdpSocket::bind(&bind)?;
    let fd = sock.as_raw_fd();
    let one: libc::c_int = 1;
    let buf: libc::c_int = 64 << 20;
    // SAFETY: valid fd, option values live for the calls.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&one as *const libc::c_int).cast(),
            4,
        );
        // SO_RCVBUFFORCE needs CAP_NET_ADMIN; fall back to the capped SO_RCVBUF.
        if libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&buf as *const libc::c_int).cast(),
            4,
        ) != 0
        {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&buf as *const libc::c_int).cast(),
                4,
            );
        }
    }
    sock.set_read_timeout(Some(std::time::Duration::from_millis(100)))?;
    println!("port {}", sock.local_addr()?.port());
    std::io::stdout().flush()?;

    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        flag.store(true, Ordering::Release);
    });

    let mut data = vec![[0u8; KEEP]; BATCH];
    let mut ctrl = vec![[0u8; 64]; BATCH];
    let mut iov: Vec<libc::iovec> = data
        .iter_mut()
        .map(|d| libc::iovec { iov_base: d.as_mut_ptr().cast(), iov_len: KEEP })
        .collect();
    // SAFETY: zeroed mmsghdr and sockaddr_storage are valid "empty" values; the pointers are
    // set below.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    let mut out: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    let mut names: Vec<libc::sockaddr_storage> =
        (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    let mut out_iov: Vec<libc::iovec> =
        (0..BATCH).map(|_| libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }).collect();
    let mut echoed = 0u64;
    let mut streams: HashMap<u32, Stream> = HashMap::with_capacity(32_768);
    let mut hist = vec![0u64; BUCKETS + 1];
    let (mut packets, mut lost, mut reordered, mut truncated_ctrl) = (0u64, 0u64, 0u64, 0u64);
    let mut max_dev_ns = 0i64;
    while !done.load(Ordering::Acquire) {
        for i in 0..BATCH {
            let h = &mut msgs[i].msg_hdr;
            h.msg_iov = &mut iov[i];
            h.msg_iovlen = 1;
            h.msg_control = ctrl[i].as_mut_ptr().cast();
            h.msg_controllen = ctrl[i].len();
            h.msg_name = (&raw mut names[i]).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        }
        // SAFETY: msgs point at live buffers of the stated sizes.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            continue; // timeout (to look at `done`) or EINTR
        }
        if echo {
            for i in 0..n as usize {
                out_iov[i] = libc::iovec {
                    iov_base: data[i].as_mut_ptr().cast(),
                    iov_len: (msgs[i].msg_len as usize).min(KEEP),
                };
                let h = &mut out[i].msg_hdr;
                h.msg_iov = &mut out_iov[i];
                h.msg_iovlen = 1;
                h.msg_name = (&raw mut names[i]).cast();
                h.msg_namelen = msgs[i].msg_hdr.msg_namelen;
            }
            // SAFETY: `out` points at the received buffers and their sources, all live; a
            // full send buffer drops the rest of the batch (the engine sees loss, as on a
            // network).
            let sent =
                unsafe { libc::sendmmsg(fd, out.as_mut_ptr(), n as u32, libc::MSG_DONTWAIT) };
            echoed += sent.max(0) as u64;
        }
        for i in 0..n as usize {
            let len = msgs[i].msg_len as usize;
            if len < 12 {
                continue;
            }
            let Some(ns) = kernel_time(&msgs[i].msg_hdr) else {
                truncated_ctrl += 1;
                continue;
            };
            let d = &data[i];
            let seq = u16::from_be_bytes([d[2], d[3]]);
            let ssrc = u32::from_be_bytes([d[8], d[9], d[10], d[11]]);
            packets += 1;
            let s = streams.entry(ssrc).or_default();
            if s.packets > 0 {
                let step = seq.wrapping_sub(s.last_seq);
                if step == 0 || step > 0x8000 {
                    reordered += 1;
                    continue;
                }
                lost += u64::from(step - 1);
                if step == 1 {
                    let dev = ((ns - s.last_ns) - 20_000_000).abs();
                    max_dev_ns = max_dev_ns.max(dev);
                    hist[((dev / BUCKET_NS) as usize).min(BUCKETS)] += 1;
                }
            }
            s.last_seq = seq;
            s.last_ns = ns;
            s.packets += 1;
        }
    }
    let total: u64 = hist.iter().sum();
    let pct = |p: f64| -> f64 {
        let want = (p * total as f64).ceil() as u64;
        let mut acc = 0;
        for (i, c) in hist.iter().enumerate() {
            acc += c;
            if acc >= want.max(1) {
                return (i as f64 + 1.0) * BUCKET_NS as f64 / 1e6;
            }
        }
        f64::NAN
    };
    println!(
        "streams {} packets {} lost {} reordered {} no_timestamp {} dev_ms_p50 {:.2} dev_ms_p99 {:.2} dev_ms_p999 {:.2} dev_ms_max {:.2} echoed {}",
        streams.len(),
        packets,
        lost,
        reordered,
        truncated_ctrl,
        pct(0.5),
        pct(0.99),
        pct(0.999),
        max_dev_ns as f64 / 1e6,
        echoed
    );
    Ok(())
}

/// The `SCM_TIMESTAMPNS` of a received message, in nanoseconds.
fn kernel_time(h: &libc::msghdr) -> Option<i64> {
    // SAFETY: the control buffer was filled by the kernel for this header.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                return Some(ts.tv_sec * 1_000_000_000 + ts.tv_nsec);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}
