#!/usr/bin/env python3
"""SIP + RTP load against a running precall: SIPp places calls with benches/sipp/uac_hold.xml
(pause raised to HOLD_MS), every offer points RTP at one UDP socket this script owns, and the
script reports per-call RTP pacing, loss and precall's CPU use.

    python3 benches/sipp/rtp_load.py --sip 127.0.0.1:5060 --pid $(pidof precall) \
        --calls 400 --rate 20 --limit 200 --hold-ms 10000

Prints one summary line per figure; docs/PERFORMANCE.md quotes them. Needs sipp on PATH.
"""
import argparse, collections, os, socket, struct, subprocess, sys, tempfile, time

ap = argparse.ArgumentParser()
ap.add_argument("--sip", default="127.0.0.1:5060")
ap.add_argument("--pid", type=int, help="precall's pid, for its CPU use")
ap.add_argument("--calls", type=int, default=400)
ap.add_argument("--rate", type=int, default=20)
ap.add_argument("--limit", type=int, default=200)
ap.add_argument("--hold-ms", type=int, default=10000)
a = ap.parse_args()

here = os.path.dirname(os.path.abspath(__file__))
scenario = open(os.path.join(here, "uac_hold.xml")).read()
scenario = scenario.replace('<pause milliseconds="3000"/>', f'<pause milliseconds="{a.hold_ms}"/>')
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
print(f"packets/s at the receiver {total / elapsed:.0f} over {elapsed:.1f} s")
if a.pid:
    hz = os.sysconf("SC_CLK_TCK")
    print(f"precall CPU {100 * (c1 - c0) / hz / elapsed:.1f} % of one core (all threads)")
if rc != 0:
    sys.stderr.write(sipp.stderr.read().decode(errors="replace")[-2000:])
    sys.exit(1)
