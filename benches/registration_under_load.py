#!/usr/bin/env python3
"""Registering a large dataset while buyers query: an HTTP flood of small
answered queries runs throughout; an owner registers the scale-10
city_health (2 M rows) over HTTP. Reports the flood's answers/s before,
during and after the registration, the registration's wall time under load,
and the same registration's time on an idle server — one machine, one run.

    FG_BIN=$CARGO_TARGET_DIR/release/frostglass python3 benches/registration_under_load.py [SCALE]
"""
import http.client, json, os, shutil, socket, subprocess, sys, tempfile, threading, time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("FG_BIN", os.path.join(REPO, "target", "release", "frostglass"))
SCALE = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
SQL = "SELECT industry, COUNT(*) AS n FROM enterprise_registry GROUP BY industry"
CLIENTS = 8
WINDOW_S = 8.0


def run(args, cwd):
    out = subprocess.run([BIN] + args, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(args)}: {out.stderr[-300:]}")
    return (out.stdout.strip().splitlines() or [""])[-1]


def call(port, method, path, key, body=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request(method, path, json.dumps(body) if body is not None else None,
              {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    return r.status, json.loads(data) if data else None


def register(port, owner, manifest):
    """Registers; returns seconds until the dataset is active."""
    t0 = time.perf_counter()
    status, doc = call(port, "POST", "/v1/datasets", owner, manifest)
    if status != 202:
        sys.exit(f"registration refused: {status} {doc}")
    while True:
        status, doc = call(port, "GET", f"/v1/datasets/{manifest['id']}", owner)
        if doc and doc.get("status") == "active" and (doc.get("pending") or {}).get("status") != "registering":
            return time.perf_counter() - t0
        if doc and (doc.get("pending") or {}).get("status") == "failed":
            sys.exit(f"registration failed: {doc}")
        time.sleep(0.05)


def main():
    work = tempfile.mkdtemp(prefix="fg-register-")
    catalog = os.path.join(work, "catalog")
    shutil.copytree(os.path.join(REPO, "catalog"), catalog, ignore=shutil.ignore_patterns("data"))
    run(["demo-data", "--catalog", catalog, "--scale", "1"], work)
    # The owner's large data, in its domain root.
    big = os.path.join(work, "big")
    shutil.copytree(os.path.join(REPO, "catalog"), big, ignore=shutil.ignore_patterns("data"))
    for name in os.listdir(big):
        if name.endswith(".json") and name != "city_health.json":
            os.remove(os.path.join(big, name))
    t0 = time.perf_counter()
    run(["demo-data", "--catalog", big, "--scale", str(SCALE)], work)
    print(f"generated city_health at scale {SCALE} in {time.perf_counter() - t0:.1f}s", flush=True)
    data = os.path.join(work, "data")
    root = os.path.join(data, "owners", "hospital")
    for folder in ("city_a", "city_b"):
        os.makedirs(os.path.join(root, folder))
        shutil.copy(os.path.join(big, "data", "city_health.parquet"), os.path.join(root, folder, "part-0.parquet"))
    owner = run(["principal", "add", "owner:hospital", "--role", "owner", "--org", "hospital", "--data-dir", data], work)
    buyer = run(["principal", "add", "buyer:flood", "--role", "buyer", "--org", "flood", "--data-dir", data], work)
    run(["grant", "add", "--buyer", "buyer:flood", "--dataset", "enterprise_registry", "--purpose",
         "public_health_research", "--queries-per-day", "100000000", "--catalog", catalog,
         "--policies", os.path.join(REPO, "policies"), "--data-dir", data], work)
    config = os.path.join(work, "config.json")
    json.dump({"limits": {"requests_per_second": 1e6, "request_burst": 1e6}}, open(config, "w"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    log = open(os.path.join(work, "server.log"), "w")
    server = subprocess.Popen([BIN, "serve", "--config", config, "--listen", f"127.0.0.1:{port}",
                               "--catalog", catalog, "--policies", os.path.join(REPO, "policies"),
                               "--data-dir", data], cwd=work, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(480):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5); c.request("GET", "/healthz")
                if c.getresponse().status == 200: break
            except OSError:
                pass
            time.sleep(0.25)
        manifest = json.load(open(os.path.join(big, "city_health.json")))
        manifest.pop("$schema", None)

        answered = []  # completion times
        lock, stop = threading.Lock(), threading.Event()
        body = json.dumps({"sql": SQL})

        def worker():
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            while not stop.is_set():
                c.request("POST", "/v1/queries", body, {"Authorization": f"Bearer {buyer}", "Content-Type": "application/json"})
                r = c.getresponse(); r.read()
                if r.status != 200:
                    sys.exit(f"status {r.status}")
                with lock:
                    answered.append(time.perf_counter())

        ts = [threading.Thread(target=worker, daemon=True) for _ in range(CLIENTS)]
        [t.start() for t in ts]
        time.sleep(2.0)  # warm-up
        rate = lambda a, b: sum(1 for t in answered if a <= t < b) / (b - a)
        before_start = time.perf_counter()
        time.sleep(WINDOW_S)
        before = rate(before_start, time.perf_counter())
        reg_start = time.perf_counter()
        under_load = register(port, owner, dict(manifest, id="city_health_a",
                                                source={"format": "parquet", "location": os.path.join(root, "city_a")}))
        reg_end = time.perf_counter()
        during = rate(reg_start, reg_end)
        time.sleep(WINDOW_S)
        after = rate(reg_end, time.perf_counter())
        stop.set(); [t.join() for t in ts]
        time.sleep(1.0)
        idle = register(port, owner, dict(manifest, id="city_health_b",
                                          source={"format": "parquet", "location": os.path.join(root, "city_b")}))
        status, doc = call(port, "GET", "/v1/datasets/city_health_b", owner)
        rows = doc["quality"]["rows"] if doc else None
        result = {
            "scale": SCALE, "card_rows": rows, "clients": CLIENTS,
            "answers_per_s_before": round(before), "answers_per_s_during": round(during),
            "answers_per_s_after": round(after), "during_over_before": round(during / before, 3),
            "registration_s_under_load": round(under_load, 2), "registration_s_idle": round(idle, 2),
        }
        print(json.dumps(result, indent=1))
    finally:
        server.terminate(); server.wait(10)
        if not os.environ.get("FG_KEEP"):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
