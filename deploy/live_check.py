#!/usr/bin/env python3
"""The live half of the deployment checks (run by deploy/live-check.sh).

Starts a real coordinator and a 2-rank CPU worker group (preset "tiny") on
loopback, a real Prometheus (Debian's) scraping the coordinator's and both
ranks' /metrics every second with the project's rules loaded, sends a few
requests with `denoised generate`, restarts one rank to make the group
restart, and then checks through Prometheus' HTTP API:

  * every target is up and every recording/alert rule evaluates (health ok);
  * every PromQL expression of the Grafana dashboard and of the rules parses
    and returns data (template variables substituted). An alert may return
    nothing (it is not firing), and so may an expression that looks back in
    time (offset); then each series selector inside it must return data;
  * the coordinator counted exactly the steps the client saw, and the step
    quantiles Prometheus computes agree with the client's own step times
    within the histogram's bucket resolution.

Everything is bounded in time and every process is stopped at the end.
"""
import argparse
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

MODEL = "tiny"
RANKS = 2
SECRET = "live-check-secret"
# Small enough for 2 cores, big enough for steps of several milliseconds.
LATENT = ("--latent-frames", "5", "--latent-height", "32", "--latent-width", "32")
STEPS = 8
REQUESTS = 3
QUANTILES = (0.5, 0.9, 0.99)
# Grafana's variables, as "All" would expand them, over the whole test.
VARIABLES = {"$__rate_interval": "5m", "$__interval": "15s", "$__range": "5m",
             "$model": ".*", "$group": ".*"}

failures = []
procs = []  # (name, Popen)


def log(msg):
    print(f"live-check: {msg}", flush=True)


def check(ok, what):
    if ok:
        print(f"PASS {what}", flush=True)
    else:
        print(f"FAIL {what}", flush=True)
        failures.append(what)
    return ok


def free_port(count=1):
    """A port p such that p..p+count-1 are free on 127.0.0.1 right now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def start(name, args, work):
    out = open(os.path.join(work, f"{name}.log"), "wb")
    p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    procs.append((name, p))
    log(f"started {name} (pid {p.pid}): {' '.join(args)}")
    return p


def descendants(pid):
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return out
    for k in kids:
        out.append(k)
        out.extend(descendants(k))
    return out


def stop_all():
    for name, p in reversed(procs):
        if p.poll() is not None:
            continue
        tree = descendants(p.pid)
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log(f"{name} ignored SIGTERM; killing")
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)
        for pid in tree:  # ranks that left the process group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_for(what, fn, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}")
        value = fn()
        if value:
            return value
        time.sleep(0.25)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}")


class Prom:
    def __init__(self, base):
        self.base = base

    def get(self, path, **params):
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:  # 400/422 carry the error JSON
            return json.load(e)

    def query(self, expr, at=None):
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.get("/api/v1/query", **params)


# --- PromQL helpers ---------------------------------------------------------
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right",
            "and", "or", "unless", "bool", "offset", "inf", "nan"}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                "count_values", "bottomk", "topk", "quantile"}


def selectors(expr):
    """The series selectors of a PromQL expression (metric{matchers}), without
    their ranges and offsets: a small scanner, enough for our expressions."""
    out = []
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c == '"':  # a string literal
            j = i + 1
            while j < n and expr[j] != '"':
                j += 2 if expr[j] == "\\" else 1
            i = j + 1
        elif c == "[":  # a range or subquery duration
            i = expr.index("]", i) + 1
        elif c.isdigit() or (c == "." and i + 1 < n and expr[i + 1].isdigit()):
            i += 1
            while i < n and (expr[i].isalnum() or expr[i] == "."
                             or (expr[i] in "+-" and expr[i - 1] in "eE")):
                i += 1
        elif c.isalpha() or c in "_:":
            j = i
            while j < n and (expr[j].isalnum() or expr[j] in "_:"):
                j += 1
            word = expr[i:j]
            k = j
            while k < n and expr[k].isspace():
                k += 1
            inside_label_list = re.search(
                r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*$", expr[:i])
            if (k < n and expr[k] == "(") or word.lower() in KEYWORDS \
                    or word in AGGREGATIONS or inside_label_list:
                i = j  # a function, keyword, aggregation or grouping label
                continue
            if k < n and expr[k] == "{":
                j = expr.index("}", k) + 1
                word += expr[k:j]
            out.append(word)
            i = j
        else:
            i += 1
    return sorted(set(out))


def substitute(expr):
    for k in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(k, VARIABLES[k]).replace("${" + k[1:] + "}", VARIABLES[k])
    return expr


# --- the client's step times ------------------------------------------------
STEP_RE = re.compile(r"step (\d+)/(\d+) .*\| ([0-9.]+) ms/step \(all-to-all ([0-9.]+) ms, skew ([0-9.]+) ms\)")


def generate(bin_path, target, out, seed, work, name):
    args = [bin_path, "generate", "--target", target, "--model", MODEL, *LATENT,
            "--steps", str(STEPS), "--text-len", "16", "--seed", str(seed),
            "--out", out, "--deadline", "120"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=180)
    with open(os.path.join(work, f"{name}.log"), "w") as f:
        f.write(r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"{name}: denoised generate failed ({r.returncode}): {r.stderr[-800:]}")
    steps = [float(m.group(3)) / 1e3 for m in STEP_RE.finditer(r.stderr)]
    if len(steps) != STEPS:
        raise RuntimeError(f"{name}: parsed {len(steps)} step lines from generate's output, want {STEPS}:\n{r.stderr[-800:]}")
    return steps


def bucket_of(value, bounds):
    """Index of the histogram bucket (le bounds, ascending, +Inf last) that
    counts `value`, and that bucket's [lower, upper]."""
    for i, b in enumerate(bounds):
        if value <= b:
            return i, (bounds[i - 1] if i else 0.0, b)
    return len(bounds) - 1, (bounds[-2], math.inf)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--rules", required=True, help="plain rule file (validate.mjs rules)")
    ap.add_argument("--exprs", required=True, help="JSON lines (validate.mjs exprs)")
    ap.add_argument("--prometheus", default="prometheus")
    ap.add_argument("--promtool", default="promtool")
    a = ap.parse_args()
    work = a.work
    os.makedirs(work, exist_ok=True)

    # 1. Coordinator and one worker group on loopback.
    ready = os.path.join(work, "coordinator.ready")
    if os.path.exists(ready):
        os.remove(ready)
    start("coordinator", [a.bin, "coordinator", "--listen", "127.0.0.1:0",
                          "--worker-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                          "--max-queue", "16", "--secret", SECRET, "--ready-file", ready], work)
    addr = wait_for("the coordinator's ready file", lambda: os.path.exists(ready) and dict(
        line.strip().split("=", 1) for line in open(ready) if "=" in line), 30)
    target, worker_addr, coord_metrics = addr["listen"], addr["worker_listen"], addr["metrics"]
    rank_port = free_port(RANKS)
    worker = start("worker", [a.bin, "worker", "--coordinator", worker_addr, "--preset", MODEL,
                              "--ranks", str(RANKS), "--backend", "cpu", "--name", "live-check",
                              "--metrics-listen", f"127.0.0.1:{rank_port}", "--threads", "1",
                              "--secret", SECRET], work)

    def serving():
        r = subprocess.run([a.bin, "health", "--target", target, "--timeout", "2"],
                           capture_output=True, text=True)
        return r.returncode == 0
    wait_for("the coordinator to report SERVING (a READY group)", serving, 120)
    log("coordinator SERVING with worker group live-check")

    # 2. Prometheus, scraping every second, with the rules (evaluated every
    # second here instead of their production interval).
    rules_path = os.path.join(work, "rules.live.yaml")
    with open(a.rules) as f:
        rules_text = f.read()
    with open(rules_path, "w") as f:
        f.write(re.sub(r"(?m)^(\s*)interval: .*$", r"\1interval: 1s", rules_text))
    prom_port = free_port()
    rank_targets = ", ".join(f'"127.0.0.1:{rank_port + r}"' for r in range(RANKS))
    config = os.path.join(work, "prometheus.yml")
    with open(config, "w") as f:
        f.write(f"""global:
  scrape_interval: 1s
  scrape_timeout: 900ms
  evaluation_interval: 1s
rule_files:
  - {rules_path}
scrape_configs:
  - job_name: denoised-coordinator
    static_configs:
      - targets: ["{coord_metrics}"]
  - job_name: denoised-worker
    static_configs:
      - targets: [{rank_targets}]
""")
    r = subprocess.run([a.promtool, "check", "config", config], capture_output=True, text=True)
    check(r.returncode == 0, f"promtool check config (static scrape config + rules) {r.stdout.strip().splitlines()[-1:]}")
    tsdb = os.path.join(work, "tsdb")
    subprocess.run(["rm", "-rf", tsdb], check=True)
    start("prometheus", [a.prometheus, f"--config.file={config}", f"--storage.tsdb.path={tsdb}",
                         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"], work)
    prom = Prom(f"http://127.0.0.1:{prom_port}")

    def prom_ready():
        try:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"{prom.base}/-/ready", timeout=2).read()
            return True
        except OSError:
            return False
    wait_for("Prometheus to be ready", prom_ready, 30)

    def targets_up():
        t = prom.get("/api/v1/targets")["data"]["activeTargets"]
        return len(t) == 1 + RANKS and all(x["health"] == "up" for x in t) and t
    t = wait_for("all scrape targets up", targets_up, 30)
    check(True, f"{len(t)} targets up: " + ", ".join(f'{x["labels"]["job"]} {x["labels"]["instance"]}' for x in t))

    # /metrics of the coordinator and a rank parse (and lint) with promtool.
    for what, hostport in (("coordinator", coord_metrics), ("rank 0", f"127.0.0.1:{rank_port}")):
        body = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://{hostport}/metrics", timeout=5).read()
        r = subprocess.run([a.promtool, "check", "metrics"], input=body, capture_output=True)
        lint = (r.stdout + r.stderr).decode().strip()
        if r.returncode == 3:
            log(f"note: promtool lint of the {what}'s /metrics: {lint}")
        check(r.returncode in (0, 3), f"{what} /metrics parses (promtool check metrics rc={r.returncode})")

    # 3. Requests. A warm-up one first, so that every series exists before
    # the measured phase; T0 and T1 are instants whose latest scrape lies
    # after the previous phase ended and before the next began.
    def scraped_after(t):
        """Waits until every target has been scraped after wall time t."""
        def done():
            r = prom.query("timestamp(up)")
            res = r.get("data", {}).get("result", [])
            return len(res) == 1 + RANKS and all(float(x["value"][1]) > t for x in res)
        wait_for(f"a scrape of every target after {t:.3f}", done, 30)
        return time.time()

    client_steps = generate(a.bin, target, os.path.join(work, "warmup.safetensors"), 1, work, "generate-warmup")
    t0 = scraped_after(time.time())
    measured = []
    for i in range(REQUESTS):
        measured += generate(a.bin, target, os.path.join(work, f"req{i}.safetensors"), 100 + i, work, f"generate-{i}")
    t1 = scraped_after(time.time())
    client_steps += measured
    log(f"client step times (s): measured {['%.4f' % s for s in measured]}")

    # 4. Make the group restart (one rank dies; the launcher restarts the
    # group with a new generation), so the restart counter has data too.
    ranks = [pid for pid in descendants(worker.pid)]
    if not check(len(ranks) >= RANKS, f"found the worker group's rank processes {ranks}"):
        raise RuntimeError("no rank processes to restart")
    os.kill(ranks[-1], signal.SIGKILL)
    log(f"killed rank process {ranks[-1]}")

    def restarted():
        r = prom.query('denoised_worker_group_restarts_total{group="live-check"}')
        return r["status"] == "success" and r["data"]["result"]
    wait_for("denoised_worker_group_restarts_total in Prometheus", restarted, 90)
    wait_for("the group to be READY again", serving, 120)
    # Let every rule evaluate a few times on the final data.
    time.sleep(3)

    # 5. Exactness: the coordinator counted each step the client saw, once,
    # and Prometheus' quantiles match the client's within a bucket.
    sel = f'denoised_step_duration_seconds_bucket{{model="{MODEL}",ranks="{RANKS}"}}'
    delta = f"({sel} - {sel} @ {t0:.3f})"
    r = prom.query(f"sum by (le) {delta}", at=t1)
    buckets = sorted(((float(x["metric"]["le"]), float(x["value"][1])) for x in r["data"]["result"]),
                     key=lambda b: b[0])
    bounds = [b for b, _ in buckets]
    count = buckets[-1][1] if buckets else -1
    check(count == len(measured), f"coordinator counted {count:g} steps in the measured phase; the client saw {len(measured)}")
    for metric in ("denoised_alltoall_duration_seconds", "denoised_rank_skew_seconds"):
        s = f'{metric}_count{{model="{MODEL}",ranks="{RANKS}"}}'
        r = prom.query(f"sum({s} - {s} @ {t0:.3f})", at=t1)
        n = float(r["data"]["result"][0]["value"][1]) if r["data"]["result"] else -1
        check(n == len(measured), f"{metric}: {n:g} observations for {len(measured)} steps")
    srt = sorted(measured)
    for q in QUANTILES:
        k = max(1, math.ceil(q * len(srt)))
        client_q = srt[k - 1]
        r = prom.query(f"histogram_quantile({q}, sum by (le) {delta})", at=t1)
        server_q = float(r["data"]["result"][0]["value"][1]) if r["data"]["result"] else math.nan
        i, (lo, hi) = bucket_of(client_q, bounds)
        # The client prints milliseconds with one decimal: near a bucket
        # bound the value may round across it.
        near = [j for j in (i - 1, i + 1) if 0 <= j < len(bounds) and abs(client_q - (bounds[j] if j < i else bounds[i])) <= 5e-5]
        ok_buckets = [(lo, hi)] + [bucket_of(bounds[j] if j < i else hi + 1e-9, bounds)[1] for j in near]
        ok = any(b_lo <= server_q <= b_hi for b_lo, b_hi in ok_buckets)
        check(ok, f"step p{q * 100:g}: Prometheus {server_q:.4f} s, client {client_q:.4f} s, bucket ({lo:g}, {hi:g}]")

    # The dashboard's and the rules' quantiles (rates over the whole run,
    # warm-up included) against all the client's steps: within one bucket.
    srt_all = sorted(client_steps)
    for q in QUANTILES:
        client_q = srt_all[max(1, math.ceil(q * len(srt_all))) - 1]
        i, _ = bucket_of(client_q, bounds)
        lo = bounds[i - 2] if i >= 2 else 0.0
        hi = bounds[min(i + 1, len(bounds) - 1)]
        rec = {0.5: "p50_5m", 0.9: "p90_5m", 0.99: "p99_5m"}[q]
        for what, expr in (
                ("dashboard", f'histogram_quantile({q}, sum by (model, ranks, le) (rate(denoised_step_duration_seconds_bucket{{model=~".*"}}[5m])))'),
                ("recording rule", f"model_ranks:denoised_step_duration_seconds:{rec}")):
            r = prom.query(expr)
            vals = [float(x["value"][1]) for x in r["data"]["result"] if x["metric"].get("model") == MODEL]
            check(len(vals) == 1 and lo <= vals[0] <= hi,
                  f"{what} step p{q * 100:g} = {vals} s, client {client_q:.4f} s (accepted: {lo:g}..{hi:g})")

    # 6. Every rule is healthy in Prometheus.
    groups = prom.get("/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    bad = [f'{r.get("name")}: {r.get("lastError")}' for r in rules if r.get("health") != "ok"]
    check(rules and not bad, f"{len(rules)} rules loaded and evaluated with health ok {bad}")
    firing = sorted({r["name"] for r in rules if r.get("type") == "alerting" and r.get("state") != "inactive"})
    log(f"alerts pending/firing now: {firing or 'none'}")

    # 7. Every expression of the dashboard and the rules parses and returns data.
    with open(a.exprs) as f:
        exprs = [json.loads(line) for line in f if line.strip()]
    check(len(exprs) > 20, f"{len(exprs)} expressions to check")
    # Recording rules that look back further than this run (the 1-day
    # baseline) are empty here by design; selectors reading them are
    # accepted once their own selectors were (rules come in file order).
    lookback = set()
    for e in exprs:
        expr = substitute(e["expr"])
        r = prom.query(expr)
        if r.get("status") != "success":
            check(False, f'{e["source"]}: {r.get("errorType")}: {r.get("error")}')
            continue
        n = len(r["data"]["result"])
        if n:
            check(True, f'{e["source"]}: {n} series')
            continue
        if e["kind"] != "alert" and "offset" not in expr:
            check(False, f'{e["source"]}: no data: {expr}')
            continue
        # Not firing (or looking back further than this run): the series it
        # reads must exist.
        empty = []
        sels = selectors(expr)
        for s in sels:
            if s.split("{")[0] in lookback:
                continue
            rs = prom.query(s)
            if rs.get("status") != "success" or not rs["data"]["result"]:
                empty.append(s)
        why = "not firing" if e["kind"] == "alert" else "looks back further than this run"
        read_lookback = [s for s in sels if s.split("{")[0] in lookback]
        if check(sels and not empty, f'{e["source"]}: empty ({why}); its selectors {sels} '
                 + (f"lack data: {empty}" if empty else "return data")
                 + (f" (or look back further than this run: {read_lookback})" if read_lookback else "")) \
                and e["kind"] == "record":
            lookback.add(e["source"].split(" ", 1)[1])


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rc = 0
    try:
        main()
    except Exception as e:  # noqa: BLE001 - report and clean up
        print(f"FAIL {type(e).__name__}: {e}", flush=True)
        failures.append(str(e))
    finally:
        stop_all()
    leftovers = [n for n, p in procs if p.poll() is None]
    if leftovers:
        failures.append(f"still running: {leftovers}")
    if failures:
        print(f"live-check: {len(failures)} check(s) failed; logs in {sys.argv[sys.argv.index('--work') + 1] if '--work' in sys.argv else '.'}")
        rc = 1
    else:
        print("live-check: all checks passed")
    sys.exit(rc)
