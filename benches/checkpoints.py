#!/usr/bin/env python3
"""Checkpoint cadence under load: the same HTTP flood of small answered
queries against servers that sign a checkpoint per commit (interval 0) and on
a cadence (2 ms, 10 ms), interleaved, on one machine in one run. Reports
answers/s, latency percentiles and signatures per second (tree heads stored).

    FG_BIN=$CARGO_TARGET_DIR/release/frostglass python3 benches/checkpoints.py [QUERIES] [ROUNDS]
"""
import http.client, json, os, shutil, socket, sqlite3, subprocess, sys, tempfile, threading, time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("FG_BIN", os.path.join(REPO, "target", "release", "frostglass"))
SQL = "SELECT industry, COUNT(*) AS n FROM enterprise_registry GROUP BY industry"
CLIENTS = 8


def run(args, cwd):
    out = subprocess.run([BIN] + args, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(args)}: {out.stderr[-300:]}")
    return (out.stdout.strip().splitlines() or [""])[-1]


def flood(interval_ms, queries, catalog):
    work = tempfile.mkdtemp(prefix="fg-ckpt-")
    data = os.path.join(work, "data")
    key = run(["principal", "add", "buyer:flood", "--role", "buyer", "--org", "flood", "--data-dir", data], work)
    run(["grant", "add", "--buyer", "buyer:flood", "--dataset", "enterprise_registry", "--purpose",
         "public_health_research", "--queries-per-day", "100000000", "--catalog", catalog,
         "--policies", os.path.join(REPO, "policies"),
         "--data-dir", data], work)
    config = os.path.join(work, "config.json")
    json.dump({"limits": {"requests_per_second": 1e6, "request_burst": 1e6},
               "checkpoint_interval_ms": interval_ms}, open(config, "w"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    log = open(os.path.join(work, "server.log"), "w")
    server = subprocess.Popen([BIN, "serve", "--config", config, "--listen", f"127.0.0.1:{port}",
                               "--catalog", catalog, "--policies", os.path.join(REPO, "policies"),
                               "--data-dir", data], cwd=work, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(240):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5); c.request("GET", "/healthz")
            if c.getresponse().status == 200: break
        except OSError:
            pass
        time.sleep(0.25)
    db = sqlite3.connect(os.path.join(data, "frostglass.db"))
    heads_before = db.execute("SELECT COUNT(*) FROM tree_heads").fetchone()[0]
    latencies, lock, done = [], threading.Lock(), [0]
    body = json.dumps({"sql": SQL})

    def worker():
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        while True:
            with lock:
                if done[0] >= queries: break
                done[0] += 1
            t0 = time.perf_counter()
            c.request("POST", "/v1/queries", body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            r = c.getresponse(); r.read()
            if r.status != 200: sys.exit(f"status {r.status}")
            mine.append(time.perf_counter() - t0)
        with lock: latencies.extend(mine)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(CLIENTS)]
    [t.start() for t in ts]; [t.join() for t in ts]
    elapsed = time.perf_counter() - t0
    heads = db.execute("SELECT COUNT(*) FROM tree_heads").fetchone()[0] - heads_before
    server.terminate(); server.wait(10)
    shutil.rmtree(work, ignore_errors=True)
    latencies.sort()
    pct = lambda p: 1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))]
    return {"interval_ms": interval_ms, "answers_per_s": round(queries / elapsed), "p50_ms": round(pct(0.5), 2),
            "p99_ms": round(pct(0.99), 2), "signatures_per_s": round(heads / elapsed), "heads": heads}


def main():
    queries = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    catalog = tempfile.mkdtemp(prefix="fg-ckpt-catalog-")
    for f in os.listdir(os.path.join(REPO, "catalog")):
        if f.endswith(".json"): shutil.copy(os.path.join(REPO, "catalog", f), catalog)
    run(["demo-data", "--catalog", catalog, "--scale", "1"], catalog)
    results = {}
    for _ in range(rounds):
        for interval in (0, 2, 10):
            r = flood(interval, queries, catalog)
            print(json.dumps(r), flush=True)
            results.setdefault(interval, []).append(r)
    print("| checkpoint interval | answers/s | p50 ms | p99 ms | signatures/s |")
    print("|---:|---:|---:|---:|---:|")
    for interval, rs in results.items():
        med = lambda k: sorted(x[k] for x in rs)[len(rs) // 2]
        print(f"| {interval} ms | {med('answers_per_s')} | {med('p50_ms')} | {med('p99_ms')} | {med('signatures_per_s')} |")
    shutil.rmtree(catalog, ignore_errors=True)


if __name__ == "__main__":
    main()
