#!/usr/bin/env python3
"""SIP + RTP load against a running precall: SIPp places calls with benches/sipp/uac_hold.xml
(pause raised to HOLD_MS), every offer points RTP at one UDP socket this script owns, and the
script reports per-call RTP pacing, loss and precall's CPU use.

    python3 benches/sipp/rtp_load.py --sip 127.0.0.1:5060 --pid $(pidof precall) \
        --calls 400 --rate 20 --limit 200 --hold-ms 10000

With --flood-pps N a second sender aims N out-of-dialog OPTIONS per second (each a new
Call-ID, so they spread over the shards) at the SIP port for as long as SIPp runs: the pacing
figures then say whether a SIP flood delays the media clock.

With --accept-503 a call that precall refuses with 503 (overload admission, drain) is ACKed and
counted as refused instead of failed: "calls with RTP" are then the admitted ones, and SIPp's
exit status says whether any admitted call failed.

Prints one summary line per figure; docs/PERFORMANCE.md quotes them. Needs sipp on PATH.
"""
import argparse, collections, multiprocessing, os, socket, struct, subprocess, sys, tempfile, time

ap = argparse.ArgumentParser()
ap.add_argument("--sip", default="127.0.0.1:5060")
ap.add_argument("--pid", type=int, help="precall's pid, for its CPU use")
ap.add_argument("--calls", type=int, default=400)
ap.add_argument("--rate", type=int, default=20)
ap.add_argument("--limit", type=int, default=200)
ap.add_argument("--hold-ms", type=int, default=10000)
ap.add_argument("--flood-pps", type=int, default=0, help="OPTIONS per second during the run")
ap.add_argument("--accept-503", action="store_true", help="a 503 ends the call as refused, not failed")
a = ap.parse_args()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import hold_scenario  # noqa: E402 (benches/sipp/common.py)

scenario = hold_scenario(a.hold_ms, a.accept_503)
tmp = tempfile.NamedTemporaryFile("w", suffix=".xml", delete=False)
tmp.write(scenario)
tmp.close()

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
sock.bind(("127.0.0.1", 0))
sock.settimeout(0.2)
port = sock.getsockname()[1]

def cpu_ticks(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])

t0 = time.monotonic()
c0 = cpu_ticks(a.pid) if a.pid else 0
sipp = subprocess.Popen(
    ["sipp", a.sip, "-sf", tmp.name, "-i", "127.0.0.1", "-p", "0",
     "-set", "rtp_ip", "127.0.0.1", "-set", "rtp_port", str(port),
     "-m", str(a.calls), "-r", str(a.rate), "-l", str(a.limit), "-timeout", "600s"],
    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tempfile.gettempdir())

def flooder(sent, answered, stop):
    """Sends --flood-pps OPTIONS per second in 10 ms batches until told to stop, and counts
    the answers (read on the same socket). A process of its own, so that it does not share
    the receiver's interpreter lock (which would skew the measured arrival times)."""
    host, port_s = a.sip.rsplit(":", 1)
    dest = (host, int(port_s))
    f = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    f.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    f.bind(("127.0.0.1", 0))
    f.setblocking(False)
    me = f.getsockname()[1]
    per_batch = max(1, a.flood_pps // 100)
    n = 0
    next_at = time.monotonic()
    while not stop.is_set():
        for _ in range(per_batch):
            n += 1
            msg = (f"OPTIONS sip:{a.sip} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bKfl{n};rport\r\n"
                   f"Max-Forwards: 70\r\nFrom: <sip:flood@127.0.0.1>;tag=f{n}\r\nTo: <sip:{a.sip}>\r\n"
                   f"Call-ID: flood{n}@127.0.0.1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
            try:
                f.sendto(msg.encode(), dest)
                sent.value += 1
            except BlockingIOError:
                pass
        while True:
            try:
                f.recv(4096)
                answered.value += 1
            except BlockingIOError:
                break
        next_at += 0.010
        time.sleep(max(0.0, next_at - time.monotonic()))

flood_sent, flood_answered = multiprocessing.Value("q", 0), multiprocessing.Value("q", 0)
flood_stop = multiprocessing.Event()
flood_proc = None
if a.flood_pps:
    flood_proc = multiprocessing.Process(target=flooder, args=(flood_sent, flood_answered, flood_stop))
    flood_proc.start()

streams = collections.defaultdict(list)  # ssrc -> [(arrival, seq)]
total = 0
while True:
    try:
        data = sock.recv(2048)
    except socket.timeout:
        if sipp.poll() is not None:
            break
        continue
    now = time.monotonic()
    seq, _ts, ssrc = struct.unpack("!HII", data[2:12])
    streams[ssrc].append((now, seq))
    total += 1
elapsed = time.monotonic() - t0
c1 = cpu_ticks(a.pid) if a.pid else 0
if flood_proc:
    flood_stop.set()
    flood_proc.join(10)
rc = sipp.wait()
os.unlink(tmp.name)

gaps, deviation, late = 0, [], 0
for pkts in streams.values():
    for (t1, s1), (t2, s2) in zip(pkts, pkts[1:]):
        gaps += ((s2 - s1) & 0xFFFF) - 1
        deviation.append(abs((t2 - t1) - 0.020) * 1000)
deviation.sort()
pct = lambda p: deviation[min(len(deviation) - 1, int(p * len(deviation)))] if deviation else 0
print(f"sipp exit status {rc} ({'no failed call' if rc == 0 else 'FAILED CALLS'})")
print(f"calls with RTP {len(streams)} of {a.calls}; packets {total}; lost (sequence gaps) {gaps}")
print(f"inter-arrival deviation from 20 ms: p50 {pct(0.5):.2f} ms, p99 {pct(0.99):.2f} ms, "
      f"p99.9 {pct(0.999):.2f} ms, max {deviation[-1] if deviation else 0:.2f} ms")
if a.accept_503:
    print(f"calls without RTP (refused with 503): {a.calls - len(streams)}")
print(f"packets/s at the receiver {total / elapsed:.0f} over {elapsed:.1f} s")
if a.flood_pps:
    print(f"flood: {flood_sent.value} OPTIONS sent ({flood_sent.value / elapsed:.0f}/s), "
          f"{flood_answered.value} answered")
if a.pid:
    hz = os.sysconf("SC_CLK_TCK")
    print(f"precall CPU {100 * (c1 - c0) / hz / elapsed:.1f} % of one core (all threads)")
if rc != 0:
    sys.stderr.write(sipp.stderr.read().decode(errors="replace")[-2000:])
    sys.exit(1)
