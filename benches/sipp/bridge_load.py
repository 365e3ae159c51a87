#!/usr/bin/env python3
"""Bridged-call load: starts `precall demo-agent` and `precall` (AGENT_WS_URL pointing at the
demo agent, clones ready at once), places CALLS calls with SIPp (benches/sipp/uac_bridge.xml:
7 s of recorded speech from sip-tester's g711a.pcap, then the caller hangs up after
--call-ms), and prints precall's own figures: the bridge latency histograms of /metrics
(caller RTP in -> agent message out, agent audio in -> RTP out, clone ready -> first agent
audio), CPU and peak RSS, with the most agent legs seen open at once.

    cargo build --release --bin precall
    python3 benches/sipp/bridge_load.py --calls 1 --limit 1
    python3 benches/sipp/bridge_load.py --calls 500 --rate 50 --limit 500 --call-ms 20000

Traffic stays on 127.0.0.1; everything started is stopped at the end (bounded by --call-ms and
the SIPp timeout). Needs sipp on PATH.
"""
import argparse, os, re, signal, socket, subprocess, sys, tempfile, time, urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/release/precall")
ap.add_argument("--calls", type=int, default=1)
ap.add_argument("--rate", type=int, default=10)
ap.add_argument("--limit", type=int, default=1)
ap.add_argument("--call-ms", type=int, default=12000)
ap.add_argument("--chunk-ms", type=int, default=40)
a = ap.parse_args()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import free_port as free  # noqa: E402 (benches/sipp/common.py)

here = os.path.dirname(os.path.abspath(__file__))
# A 20 ms greeting, so that "clone ready -> first agent audio" measures the bridge, not the
# shipped 5.8 s greeting (which plays to its end before the agent speaks).
greeting = os.path.join(tempfile.gettempdir(), "precall-bench-greeting.wav")
with open(greeting, "wb") as f:
    data = b"\x00\x00" * 160
    f.write(b"RIFF" + (36 + len(data)).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
            + (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + (8000).to_bytes(4, "little")
            + (16000).to_bytes(4, "little") + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
            + b"data" + len(data).to_bytes(4, "little") + data)
agent_port, http_port, sip_port = free(socket.SOCK_STREAM), free(socket.SOCK_STREAM), free(socket.SOCK_DGRAM)
agent = subprocess.Popen([a.bin, "demo-agent", f"127.0.0.1:{agent_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
env = dict(os.environ, HTTP_HOST="127.0.0.1", HTTP_PORT=str(http_port), SIP_HOST="127.0.0.1",
           SIP_PORT=str(sip_port), SHARDS="2", SHARD_PIN_CORES="false", LOG_LEVEL="warn",
           SIMULATED_CLONE_DELAY_MS="0", STATUS_POLL_INTERVAL_MS="200", MAX_HOLD_MS="600000",
           RTP_TIMEOUT_MS="600000", AGENT_CHUNK_MS=str(a.chunk_ms), GREETING_AUDIO_URL="file://" + greeting,
           AGENT_WS_URL=f"ws://127.0.0.1:{agent_port}/v1/convai/conversation")
log_path = os.path.join(tempfile.gettempdir(), "precall-bridge-load.log")
precall = subprocess.Popen([a.bin], env=env, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))

def metrics():
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
        return r.read().decode()

deadline = time.monotonic() + 30
while True:
    try:
        metrics()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise SystemExit("precall did not start")
        time.sleep(0.1)

def cpu_ticks(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])

def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0

rss0 = rss_kb(precall.pid)
t0, c0, a0 = time.monotonic(), cpu_ticks(precall.pid), cpu_ticks(agent.pid)
sipp = subprocess.Popen(
    ["sipp", f"127.0.0.1:{sip_port}", "-sf", os.path.join(here, "uac_bridge.xml"), "-i", "127.0.0.1",
     "-p", "0", "-mp", str(free(socket.SOCK_DGRAM)), "-d", str(a.call_ms),
     "-m", str(a.calls), "-r", str(a.rate), "-l", str(a.limit), "-timeout", "900s"],
    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tempfile.gettempdir())
peak_rss, peak_legs = rss0, 0
while sipp.poll() is None:
    time.sleep(0.5)
    peak_rss = max(peak_rss, rss_kb(precall.pid))
    legs = sum(int(v) for v in re.findall(r"^precall_agent_legs\{[^}]*\} (\d+)", metrics(), re.M))
    peak_legs = max(peak_legs, legs)
elapsed, cpu = time.monotonic() - t0, cpu_ticks(precall.pid) - c0
agent_cpu = cpu_ticks(agent.pid) - a0
text = metrics()
precall.send_signal(signal.SIGTERM)
agent.send_signal(signal.SIGTERM)
precall.wait(timeout=30)
agent.wait(timeout=30)

print(f"sipp exit status {sipp.returncode} ({'no failed call' if sipp.returncode == 0 else sipp.stderr.read().decode()[-300:]})")
print(f"calls {a.calls}, at most {peak_legs} agent legs open at once, AGENT_CHUNK_MS={a.chunk_ms}")
for name, direction in [("latency", "to_agent"), ("latency", "to_caller"), ("latency", "first_audio"),
                        ("added_latency", "to_agent"), ("added_latency", "to_caller")]:
    buckets = [(float(le) if le != "+Inf" else float("inf"), int(n)) for le, n in re.findall(
        r'precall_bridge_%s_seconds_bucket\{direction="%s",le="([^"]+)"\} (\d+)' % (name, direction), text)]
    total = buckets[-1][1] if buckets else 0
    def pct(p):
        for le, n in buckets:
            if n >= p * total:
                return le * 1000
        return float("nan")
    s = re.search(r'precall_bridge_%s_seconds_sum\{direction="%s"\} ([0-9.e+-]+)' % (name, direction), text)
    mean = float(s.group(1)) * 1000 / total if total and s else float("nan")
    what = direction if name == "latency" else f"added {direction} (beyond chunking / framing)"
    print(f"{what}: {total} samples, mean {mean:.3f} ms, p50 <= {pct(0.5):g} ms, p99 <= {pct(0.99):g} ms (bucket bounds)")
ticks = os.sysconf("SC_CLK_TCK")
share = cpu / ticks / elapsed * 100
print(f"precall CPU {share:.1f} % of one core over {elapsed:.1f} s; RSS {rss0/1024:.1f} MB idle, {peak_rss/1024:.1f} MB peak"
      + (f", {(peak_rss-rss0)/max(peak_legs,1):.1f} KB per bridged call" if peak_legs else ""))
print(f"precall's log: {log_path}")
print(f"demo agent CPU {agent_cpu / ticks / elapsed * 100:.1f} % of one core (same 2 cores, with SIPp)")
