#!/usr/bin/env python3
"""Carrier-scale load on one node: starts `precall`, drives the real SIPp in steps, and prints
one table with PASS/FAIL against issue 14's targets (docs/PERFORMANCE.md "Carrier scale").

    cargo build --release --bin precall --bin rtp_sink
    python3 benches/carrier_load.py                      # every phase, under 10 minutes
    python3 benches/carrier_load.py --phases short       # one phase (short,overload,cliff,held,bridged,kamailio)
    python3 benches/carrier_load.py --quick              # shorter steps, 60 s of cliff

Phases (each on a freshly started precall, SHARDS=2, LOG_LEVEL=warn):
* short: whole calls (benches/sipp/uac_short.xml: INVITE -> 200 -> ACK -> BYE) at rising
  rates; per step calls/s asked and achieved, failures, INVITE -> 200 p50/p99 (SIPp's rtd),
  CPU per precall thread, RSS. The best step must reach SHORT_TARGET with 0 failures.
* overload: twice the best rate; the excess must be answered 503 (refused, not failed), the
  admitted calls 0 failures and >= 90 % of the best rate. Also: no plan is dropped on the way
  to a shard (precall's log has no "could not deliver a plan").
* cliff: CLIFF_RATE calls/s for CLIFF_SECS; no 10-second window under 95 % of the asked rate,
  RSS level after the first minute (no 10-second sample more than 10 % over the first
  minute's end) and under 300 MB.
* held: calls that stay up with hold audio at rising concurrency; benches/rtp_sink (this
  project's receiver, recvmmsg) is the far end of every stream: frames lost, inter-arrival,
  and precall's own pacing histogram (precall_media_send_lateness_seconds).
* bridged: benches/sipp/bridge_load.py with --bridged calls at once and the demo agent;
  precall's bridge histograms: the whole delays (1 ms-wide first bucket, chunking and framing
  included) and the added ones, which the target is about (precall_bridge_added_latency_seconds:
  a chunk's deadline to its hand-off to the agent leg; agent audio's first grid instant to its
  frame out; buckets from 50 us).
* kamailio (with --kamailio): Debian's kamailio answering the same scenario statelessly
  (sl_send_reply, no dialog, no media), the reference, and precall's ratio to it.

Traffic goes to 127.0.0.1 only; every process started is stopped by its pid at the end, and
the whole run is bounded (--budget, 600 s by default: a phase that would not fit is skipped
and says so). SIPp, the receiver and precall share this machine's cores: the figures are
the node's with its load tools beside it, and the table says which tool was the limit.
Needs sipp (and kamailio for --kamailio) on PATH: `bash tests/run.sh` installs both.
"""
import argparse, csv, glob, os, re, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request

SHORT_TARGET = 15_000
CLIFF_RATE = 8_000
HELD_TARGET = 10_000
RSS_LIMIT_MB = 300

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--bin", default="target/release/precall")
ap.add_argument("--phases", default="short,overload,cliff,held,bridged")
ap.add_argument("--kamailio", action="store_true", help="also run the stateless Kamailio reference")
ap.add_argument("--quick", action="store_true", help="shorter steps and a 60 s cliff")
ap.add_argument("--budget", type=float, default=600.0, help="seconds for the whole run")
ap.add_argument("--rates", default="4000,8000,12000,15000,18000", help="short-call steps, calls/s")
ap.add_argument("--step-secs", type=float, default=8.0)
ap.add_argument("--cliff-secs", type=float, default=300.0)
ap.add_argument("--held", default="2500,5000,10000", help="held-call steps, calls at once")
ap.add_argument("--held-secs", type=float, default=20.0, help="seconds each held step stays at its peak")
ap.add_argument("--held-one-way", action="store_true",
                help="held calls without the callers' RTP (by default the sink echoes every packet: two-way RTP)")
ap.add_argument("--bridged", type=int, default=1000, help="bridged calls at once (phase bridged)")
ap.add_argument("--shards", type=int, default=2, help="precall's SHARDS (the scaling figures: 1 against 2)")
a = ap.parse_args()
if a.quick:
    a.step_secs, a.cliff_secs, a.held_secs = 5.0, 60.0, 10.0
phases = [p.strip() for p in a.phases.split(",") if p.strip()]
if a.kamailio and "kamailio" not in phases:
    phases.append("kamailio")
here = os.path.dirname(os.path.abspath(__file__))
started = time.monotonic()
work = tempfile.mkdtemp(prefix="precall-carrier-")
rows = []  # (phase, what, figure, target, verdict)
ours = []  # every process we started, stopped by pid at the end


def left():
    return a.budget - (time.monotonic() - started)


sys.path.insert(0, os.path.join(here, "sipp"))
from common import free_port as free  # noqa: E402 (benches/sipp/common.py)


def stop(proc, sig=signal.SIGTERM, wait=30):
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def row(phase, what, figure, target="", ok=None):
    verdict = "" if ok is None else ("PASS" if ok else "FAIL")
    rows.append((phase, what, figure, target, verdict))
    print(f"  {phase:9} {what:44} {figure:36} {target:22} {verdict}", flush=True)


# ----- precall -----

class Precall:
    """A precall node on loopback, with its log in the work folder."""

    def __init__(self, name, **extra):
        self.sip_port, self.http_port = free(socket.SOCK_DGRAM), free(socket.SOCK_STREAM)
        env = dict(os.environ, HTTP_HOST="127.0.0.1", HTTP_PORT=str(self.http_port),
                   SIP_HOST="127.0.0.1", SIP_PORT=str(self.sip_port), SHARDS=str(a.shards),
                   SHARD_PIN_CORES="false", LOG_LEVEL="warn", SIMULATED_CLONE_DELAY_MS="600000",
                   MAX_HOLD_MS="3600000", CLONE_JOB_TIMEOUT_MS="3600000", RTP_TIMEOUT_MS="3600000")
        env.update({k: str(v) for k, v in extra.items()})
        self.log = os.path.join(work, f"precall-{name}.log")
        self.proc = subprocess.Popen([a.bin], env=env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "w"))
        ours.append(self.proc)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.metrics()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit(f"precall did not start; see {self.log}")
                time.sleep(0.1)

    def metrics(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def gauge(self, name, text=None):
        text = text if text is not None else self.metrics()
        return sum(float(v) for v in re.findall(r"^%s(?:\{[^}]*\})? ([0-9.e+-]+)$" % name, text, re.M))

    def rss_mb(self):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def threads(self):
        """CPU ticks per thread name (shard-0, shard-1, precall-control, the rest summed)."""
        out = {}
        for stat in glob.glob(f"/proc/{self.proc.pid}/task/*/stat"):
            try:
                text = open(stat).read()
            except OSError:
                continue
            name = text[text.index("(") + 1:text.rindex(")")]
            f = text.rsplit(")", 1)[1].split()
            key = name if name.startswith(("shard-", "precall-control")) else "other"
            out[key] = out.get(key, 0) + int(f[11]) + int(f[12])
        return out

    def sip_socket_drops(self):
        """Datagrams the kernel dropped on precall's SIP sockets (full receive buffers)."""
        drops = 0
        for line in open("/proc/net/udp").read().splitlines()[1:]:
            f = line.split()
            if int(f[1].split(":")[1], 16) == self.sip_port:
                drops += int(f[-1])
        return drops

    def plans_dropped(self):
        return open(self.log).read().count("could not deliver a plan")

    def stop(self):
        stop(self.proc)


HZ = os.sysconf("SC_CLK_TCK")


def cpu_share(before, after, secs):
    keys = sorted(set(before) | set(after))
    return ", ".join(f"{k} {100 * (after.get(k, 0) - before.get(k, 0)) / HZ / secs:.0f}%" for k in keys)


# ----- SIPp -----

def sipp_short(target_port, rate, secs, tag, timeout=60):
    """Places rate*secs short calls at `rate`/s; returns SIPp's counts and INVITE->200 times."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # RTP goes here and is dropped
    sink.bind(("127.0.0.1", 0))
    d = os.path.join(work, f"sipp-{tag}")
    os.makedirs(d, exist_ok=True)
    calls = int(rate * secs)
    cmd = ["sipp", f"127.0.0.1:{target_port}", "-sf", os.path.join(here, "sipp", "uac_short.xml"),
           "-i", "127.0.0.1", "-p", "0", "-set", "rtp_ip", "127.0.0.1",
           "-set", "rtp_port", str(sink.getsockname()[1]), "-r", str(rate), "-m", str(calls),
           "-l", str(max(1000, rate * 2)), "-timeout", f"{int(timeout)}s", "-timeout_error",
           "-trace_stat", "-stf", os.path.join(d, "stat.csv"), "-fd", "1",
           "-trace_rtt", "-rtt_freq", "1000", "-trace_counts", "-max_recv_loops", "10000",
           "-max_sched_loops", "10000", "-buff_size", str(8 << 20)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=d, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(d, "stderr"), "w"))
    ours.append(proc)
    return proc, d, t0, sink


def sipp_result(proc, d, t0, sink):
    status, usage = getattr(proc, "reaped", None) or os.wait4(proc.pid, 0)[1:]
    rc = proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - t0
    sipp_cpu = 100 * (usage.ru_utime + usage.ru_stime) / elapsed
    sink.close()
    stats = list(csv.DictReader(open(os.path.join(d, "stat.csv")), delimiter=";"))
    last = stats[-1] if stats else {}
    n = lambda k: int(last.get(k, 0) or 0)
    refused = 0
    for f in glob.glob(os.path.join(d, "*_counts.csv")):
        rows_ = list(csv.DictReader(open(f), delimiter=";"))
        if rows_:
            refused = sum(int(v or 0) for k, v in rows_[-1].items() if k and re.match(r"\d+_503_Recv$", k))
    rtts = []
    for f in glob.glob(os.path.join(d, "*_rtt.csv")):
        for r in csv.reader(open(f), delimiter=";"):
            try:
                rtts.append(float(r[1]))
            except (ValueError, IndexError):
                pass
    rtts.sort()
    pct = lambda p: rtts[min(len(rtts) - 1, int(p * len(rtts)))] if rtts else float("nan")
    # Calls completed per second over the run's busy seconds (SIPp's own per-second counts).
    per_sec = [int(r.get("SuccessfulCall(P)", 0) or 0) + int(r.get("FailedCall(P)", 0) or 0) for r in stats]
    return dict(rc=rc, elapsed=elapsed, sipp_cpu=sipp_cpu, placed=n("OutgoingCall(C)") or n("TotalCallCreated"),
                ok=n("SuccessfulCall(C)") - refused, failed=n("FailedCall(C)"), refused=refused,
                p50=pct(0.5), p99=pct(0.99), per_sec=per_sec, stats=stats)


def busy_rate(res, key="ok"):
    """Admitted, completed calls per second over the seconds SIPp was placing calls."""
    secs = max(1.0, sum(1 for r in res["stats"] if int(r.get("OutgoingCall(P)", 0) or 0) > 0))
    return res[key] / secs


# ----- phases -----

best = {"rate": 0.0}


def phase_short():
    node = Precall("short")
    print(f"short calls: steps {a.rates}/s, {a.step_secs:g} s each")
    for rate in [int(r) for r in a.rates.split(",")]:
        if left() < a.step_secs + 30:
            row("short", f"{rate}/s asked", "skipped: out of time budget")
            continue
        th0, rss0, k0 = node.threads(), node.rss_mb(), node.sip_socket_drops()
        m0 = node.gauge("precall_sip_datagrams_dropped_total")
        r0 = node.gauge("precall_rtp_packets_sent_total")
        res = sipp_result(*sipp_short(node.sip_port, rate, a.step_secs, f"short-{rate}"))
        th1 = node.threads()
        kernel_drops = node.sip_socket_drops() - k0
        precall_drops = node.gauge("precall_sip_datagrams_dropped_total") - m0
        achieved = busy_rate(res)
        if res["failed"] == 0 and res["refused"] == 0:
            best["rate"] = max(best["rate"], achieved)
        if res["failed"] == 0:
            best["admitted"] = max(best.get("admitted", 0.0), achieved)
        row("short", f"{rate}/s asked: achieved/s, failed, refused",
            f"{achieved:,.0f}/s, {res['failed']} failed, {res['refused']} 503")
        row("short", f"  INVITE->200 p50 / p99", f"{res['p50']:.2f} / {res['p99']:.2f} ms")
        row("short", f"  CPU per thread", cpu_share(th0, th1, res["elapsed"]) + f"; SIPp {res['sipp_cpu']:.0f}%")
        row("short", f"  RSS", f"{rss0:.0f} -> {node.rss_mb():.0f} MB")
        row("short", f"  SIP datagrams dropped: kernel / precall", f"{kernel_drops:,} / {precall_drops:,.0f}")
        # Media runs from the 200 to the BYE: a call kept up by a slow node sends more of it.
        rtp = node.gauge("precall_rtp_packets_sent_total") - r0
        row("short", f"  RTP packets sent per admitted call", f"{rtp / max(1, res['ok']):.1f}")
    dropped = node.plans_dropped()
    node.stop()
    row("short", "best rate with 0 failures and no 503", f"{best['rate']:,.0f}/s", f">= {SHORT_TARGET:,}/s",
        best["rate"] >= SHORT_TARGET)
    row("short", "best admitted rate with 0 failures (503s aside)", f"{best.get('admitted', 0):,.0f}/s")
    row("short", "plans dropped on the way to a shard", str(dropped), "0", dropped == 0)


def phase_overload():
    base = best["rate"] or best.get("admitted", 0.0)
    if not base:
        return row("overload", "twice the best rate", "skipped: no short-call rate measured")
    best["rate"] = base
    ask = int(2 * base)
    node = Precall("overload")
    th0 = node.threads()
    res = sipp_result(*sipp_short(node.sip_port, ask, a.step_secs, f"overload-{ask}"))
    th1 = node.threads()
    admitted = busy_rate(res)
    placed_rate = res["placed"] / max(1.0, a.step_secs)
    dropped = node.plans_dropped()
    node.stop()
    row("overload", f"{ask}/s asked (SIPp placed {placed_rate:,.0f}/s)",
        f"{admitted:,.0f}/s admitted, {res['refused']} 503", f">= {0.9 * best['rate']:,.0f}/s",
        admitted >= 0.9 * best["rate"])
    row("overload", "failures among admitted calls", str(res["failed"]), "0", res["failed"] == 0)
    row("overload", "CPU per thread", cpu_share(th0, th1, res["elapsed"]) + f"; SIPp {res['sipp_cpu']:.0f}%")
    row("overload", "plans dropped on the way to a shard", str(dropped), "0", dropped == 0)


def phase_cliff():
    secs = a.cliff_secs
    if left() < secs + 40:
        secs = max(30.0, left() - 40)
        if left() < 70:
            return row("cliff", f"{CLIFF_RATE}/s", "skipped: out of time budget")
    node = Precall("cliff")
    proc, d, t0, sink = sipp_short(node.sip_port, CLIFF_RATE, secs, "cliff", timeout=secs + 60)
    rss = []
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.reaped = (status, usage)  # for sipp_result: its CPU time comes with it
            break
        time.sleep(1)
        rss.append((time.monotonic() - t0, node.rss_mb()))
    text = node.metrics()
    res = sipp_result(proc, d, t0, sink)
    node.stop()
    per = res["per_sec"]
    windows = [sum(per[i:i + 10]) / 10 for i in range(1, max(2, len(per) - 10), 10)]
    # The last partial window (calls draining at the end) is not a window of the asked rate.
    windows = windows[:-1] if len(windows) > 1 else windows
    worst = min(windows) if windows else 0
    row("cliff", f"{CLIFF_RATE}/s for {secs:.0f} s: worst 10-s window", f"{worst:,.0f}/s",
        f">= {0.95 * CLIFF_RATE:,.0f}/s", worst >= 0.95 * CLIFF_RATE)
    row("cliff", "calls ok / failed / 503", f"{res['ok']:,} / {res['failed']} / {res['refused']}",
        "0 failed", res["failed"] == 0)
    after_minute = [m for t, m in rss if t >= 60] or [m for _, m in rss]
    level = after_minute[0] if after_minute else 0
    peak = max((m for _, m in rss), default=0)
    row("cliff", "RSS after 1 min / peak", f"{level:.0f} / {peak:.0f} MB",
        f"level, < {RSS_LIMIT_MB} MB", peak < RSS_LIMIT_MB and max(after_minute, default=0) <= level * 1.1 + 5)
    row("cliff", "absorbed transactions at the end / bytes",
        f"{node.gauge('precall_sip_transactions_absorbed', text):,.0f} / "
        f"{node.gauge('precall_sip_absorbed_bytes', text) / 1e6:.0f} MB")


def phase_kamailio():
    if left() < a.step_secs * 3 + 20:
        return row("kamailio", "reference", "skipped: out of time budget")
    if not shutil.which("kamailio"):
        return row("kamailio", "reference", "skipped: kamailio not installed")
    port = free(socket.SOCK_DGRAM)
    cfg = os.path.join(work, "kamailio-stateless.cfg")
    open(cfg, "w").write(f"""#!KAMAILIO
debug=0
log_stderror=yes
children=2
auto_aliases=no
listen=udp:127.0.0.1:{port}
loadmodule "sl.so"
loadmodule "textops.so"
request_route {{
    if (is_method("ACK")) {{ exit; }}
    sl_send_reply("200", "OK");
}}
""")
    k = subprocess.Popen(["kamailio", "-DD", "-E", "-m", "64", "-M", "8", "-f", cfg, "-Y", work],
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "kamailio.log"), "w"),
                         start_new_session=True)
    ours.append(k)
    # Ready once it answers an OPTIONS (its workers fork after the listener binds).
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    probe.settimeout(0.2)
    for n in range(50):
        probe.sendto((f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{probe.getsockname()[1]};branch=z9hG4bKk{n}\r\n"
                      f"From: <sip:p@127.0.0.1>;tag=k{n}\r\nTo: <sip:k@127.0.0.1>\r\nCall-ID: k{n}\r\nCSeq: 1 OPTIONS\r\n"
                      "Content-Length: 0\r\n\r\n").encode(), ("127.0.0.1", port))
        try:
            probe.recv(2048)
            break
        except OSError:
            continue
    probe.close()
    kbest = 0.0
    for rate in [int(r) for r in a.rates.split(",")][-3:]:
        res = sipp_result(*sipp_short(port, rate, a.step_secs, f"kamailio-{rate}"))
        achieved = busy_rate(res)
        if res["failed"] == 0:
            kbest = max(kbest, achieved)
        row("kamailio", f"{rate}/s asked", f"{achieved:,.0f}/s, {res['failed']} failed, SIPp {res['sipp_cpu']:.0f}% CPU")
    os.killpg(k.pid, signal.SIGTERM)
    k.wait(timeout=10)
    row("kamailio", "stateless reference, best with 0 failures", f"{kbest:,.0f}/s")
    if kbest and best["rate"]:
        row("kamailio", "precall / Kamailio", f"{best['rate'] / kbest:.2f}")


def phase_bridged():
    """benches/sipp/bridge_load.py at BRIDGED calls at once, its figures as rows."""
    calls, call_ms = a.bridged, int(a.held_secs * 1000) + 10_000
    need = calls / 100 + call_ms / 1000 + 40
    if left() < need:
        return row("bridged", f"{calls:,} bridged calls", "skipped: out of time budget")
    out = subprocess.run(
        [sys.executable, os.path.join(here, "sipp", "bridge_load.py"), "--bin", a.bin, "--calls", str(calls),
         "--rate", "100", "--limit", str(calls), "--call-ms", str(call_ms)],
        capture_output=True, text=True, timeout=need + 120).stdout
    ok = "no failed call" in out
    legs = re.search(r"at most (\d+) agent legs", out)
    row("bridged", f"{calls:,} calls with the demo agent", f"{legs.group(1) if legs else '?'} legs at once, "
        f"{'0 failed' if ok else 'FAILED CALLS'}", f"{calls:,} at once", ok and legs and int(legs.group(1)) >= calls)
    for direction in ("to_agent", "to_caller"):
        m = re.search(r"^%s: (\d+) samples, mean ([0-9.na]+) ms, p50 <= ([0-9.inf]+) ms, p99 <= ([0-9.inf]+) ms" % direction, out, re.M)
        if m:  # the whole delay, chunking and framing included: context, not the target
            row("bridged", f"  {direction} mean / p50 / p99 (buckets)", f"{m.group(2)} / <= {m.group(3)} / <= {m.group(4)} ms")
        m = re.search(r"^added %s .*?: (\d+) samples, mean ([0-9.na]+) ms, p50 <= ([0-9.inf]+) ms, p99 <= ([0-9.inf]+) ms" % direction, out, re.M)
        if m:
            row("bridged", f"  added {direction} mean / p50 / p99", f"{m.group(2)} / <= {m.group(3)} / <= {m.group(4)} ms",
                "p99 <= 1 ms", int(m.group(1)) > 0 and float(m.group(4)) <= 1.0)
    m = re.search(r"precall CPU ([0-9.]+) % of one core.*?(, [0-9.]+ KB per bridged call)?$", out, re.M)
    if m:
        row("bridged", "  precall CPU, RSS per call", f"{m.group(1)} % of a core{m.group(2) or ''}")


def phase_held():
    import carrier_held  # benches/carrier_held.py, beside this file

    carrier_held.run(a, Precall, row, left, work, ours)


PHASES = {"short": phase_short, "bridged": phase_bridged, "held": phase_held, "overload": phase_overload, "cliff": phase_cliff,
          "kamailio": phase_kamailio}

try:
    for p in phases:
        PHASES[p]()
finally:
    for proc in ours:
        if proc.poll() is None:
            stop(proc, wait=10)

print()
print(f"carrier_load: {time.monotonic() - started:.0f} s, work folder {work}")
print(f"{'phase':9} {'what':44} {'figure':36} {'target':22} verdict")
for r in rows:
    print(f"{r[0]:9} {r[1]:44} {r[2]:36} {r[3]:22} {r[4]}")
verdicts = [r[4] for r in rows if r[4]]
print(f"{verdicts.count('PASS')} PASS, {verdicts.count('FAIL')} FAIL")
