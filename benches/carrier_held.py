"""The held-call phase of benches/carrier_load.py (imported by it, not run alone).

For each step of --held (calls at once): a fresh precall whose clones never finish (every call
hears the greeting, then hold audio), SIPp placing the calls with benches/sipp/uac_hold.xml at
up to 1,000/s, each call's offer pointing RTP at benches/rtp_sink (one socket, recvmmsg,
kernel arrival times), which echoes every packet back (two-way RTP, 50 packets/s each way per
call, as a caller talks; --held-one-way turns that off). Once every call is up, a window of --held-secs measures precall's CPU
per thread, its RSS, and its own send lateness histogram; the sink reports frames lost and
inter-arrival deviation for every stream over the whole run (ramps included).
"""
import os, re, socket, subprocess, sys, time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "sipp"))
from common import hold_scenario  # noqa: E402 (benches/sipp/common.py)

HERE = os.path.dirname(os.path.abspath(__file__))
HZ = os.sysconf("SC_CLK_TCK")
PACING_P99_MS = 1.0
CPU_PER_CALL = 0.01  # % of a core
RSS_PER_CALL_KB = 8.0


def histogram(text, name):
    """Cumulative buckets (upper bound in seconds, count) of an unlabelled histogram."""
    out = []
    for le, n in re.findall(r'^%s_bucket\{le="([^"]+)"\} (\d+)$' % name, text, re.M):
        out.append((float("inf") if le == "+Inf" else float(le), int(n)))
    return out


def quantile(before, after, q):
    """The bucket bound (ms) holding quantile q of the samples added between two readings."""
    diff = [(le, n - (before[i][1] if i < len(before) else 0)) for i, (le, n) in enumerate(after)]
    total = diff[-1][1] if diff else 0
    if not total:
        return float("nan"), 0
    for le, n in diff:
        if n >= q * total:
            return le * 1000, total
    return float("inf"), total


def sip_calls(text):
    return sum(int(v) for v in re.findall(r'^precall_active_calls\{protocol="sip",[^}]*\} (\d+)$', text, re.M))


def run(a, Precall, row, left, work, ours):
    sink_bin = os.path.join(os.path.dirname(a.bin), "rtp_sink")
    if not os.path.exists(sink_bin):
        return row("held", "held calls", f"skipped: no {sink_bin} (cargo build --release -p precall-benches --bin rtp_sink)")
    steps = [int(n) for n in a.held.split(",") if n]
    for n in steps:
        rate = min(1000, max(100, n // 10))
        ramp = n / rate
        hold_ms = int((ramp + a.held_secs + 3) * 1000)
        need = ramp * 2 + a.held_secs + 25
        if left() < need:
            row("held", f"{n:,} calls at once", "skipped: out of time budget")
            continue
        node = Precall(f"held-{n}")
        sink_args = [sink_bin] if a.held_one_way else [sink_bin, "--echo"]
        sink = subprocess.Popen(sink_args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ours.append(sink)
        port = int(sink.stdout.readline().split()[1])
        scenario = hold_scenario(hold_ms, accept_503=True)
        path = os.path.join(work, f"uac_hold_{n}.xml")
        open(path, "w").write(scenario)
        d = os.path.join(work, f"sipp-held-{n}")
        os.makedirs(d, exist_ok=True)
        rss_idle = node.rss_mb()
        sipp = subprocess.Popen(
            ["sipp", f"127.0.0.1:{node.sip_port}", "-sf", path, "-i", "127.0.0.1", "-p", "0",
             "-set", "rtp_ip", "127.0.0.1", "-set", "rtp_port", str(port), "-m", str(n),
             "-r", str(rate), "-l", str(n), "-timeout", f"{int(need + 60)}s", "-timeout_error",
             "-max_socket", str(n + 100), "-buff_size", str(8 << 20)],
            cwd=d, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(d, "stderr"), "w"))
        ours.append(sipp)
        # Wait until every call is up (or the ramp is long over).
        placed_by = time.monotonic() + ramp + 3
        up = 0
        while time.monotonic() < placed_by and sipp.poll() is None:
            up = sip_calls(node.metrics())
            if up >= n:
                break
            time.sleep(0.5)
        up = sip_calls(node.metrics())
        window = max(3.0, a.held_secs - 1)
        th0, m0, t0 = node.threads(), node.metrics(), time.monotonic()
        time.sleep(window)
        th1, m1, t1 = node.threads(), node.metrics(), time.monotonic()
        rss_peak = node.rss_mb()
        up_end = sip_calls(m1)
        rc = sipp.wait()
        sink.stdin.close()
        figures = sink.stdout.readline().split()
        sink.wait(timeout=10)
        node.stop()
        f = dict(zip(figures[0::2], figures[1::2]))
        secs = t1 - t0
        cpu = {k: 100 * (th1.get(k, 0) - th0.get(k, 0)) / HZ / secs for k in set(th0) | set(th1)}
        total_cpu = sum(cpu.values())
        calls = max(1, min(up, up_end))
        p50, samples = quantile(histogram(m0, "precall_media_send_lateness_seconds"),
                                histogram(m1, "precall_media_send_lateness_seconds"), 0.5)
        p99, _ = quantile(histogram(m0, "precall_media_send_lateness_seconds"),
                          histogram(m1, "precall_media_send_lateness_seconds"), 0.99)
        lost = int(f.get("lost", -1))
        label = f"{n:,} calls asked ({min(up, up_end):,} up in the window)"
        refused = n - int(f.get("streams", 0))
        row("held", label, f"SIPp exit {rc}, {f.get('streams')} streams, {refused} refused 503",
            f"{n:,} up, 0 failed", rc == 0 and min(up, up_end) >= n)
        row("held", "  frames lost (sink, whole run)", f"{lost} of {f.get('packets')}", "0", lost == 0)
        row("held", "  inter-arrival - 20 ms p50/p99/p99.9/max (sink)",
            f"{f.get('dev_ms_p50')} / {f.get('dev_ms_p99')} / {f.get('dev_ms_p999')} / {f.get('dev_ms_max')} ms")
        row("held", "  engine send lateness p50 / p99", f"<= {p50:g} / <= {p99:g} ms ({samples:,} samples)",
            f"p99 <= {PACING_P99_MS:g} ms", p99 <= PACING_P99_MS)
        row("held", "  precall CPU per call", f"{total_cpu / calls:.4f} % ({total_cpu:.0f} % of a core)",
            f"<= {CPU_PER_CALL} %", total_cpu / calls <= CPU_PER_CALL)
        row("held", "  CPU per thread", ", ".join(f"{k} {v:.0f}%" for k, v in sorted(cpu.items())))
        rtp_in = (node.gauge("precall_rtp_packets_received_total", m1)
                  - node.gauge("precall_rtp_packets_received_total", m0)) / secs / calls
        row("held", "  caller RTP received per call (two-way unless --held-one-way)", f"{rtp_in:.1f} packets/s")
        per_call_kb = (rss_peak - rss_idle) * 1024 / calls
        row("held", "  RSS per call", f"{per_call_kb:.1f} KB ({rss_idle:.0f} -> {rss_peak:.0f} MB)",
            f"<= {RSS_PER_CALL_KB:g} KB", per_call_kb <= RSS_PER_CALL_KB)
