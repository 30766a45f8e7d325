#!/usr/bin/env python3
"""Utility at equal ε: Frostglass beside OpenDP SmartNoise SQL on the same file.

Generates the demo data (scale 1 unless given), starts the real binary, asks
each suite query RUNS times (a fresh plan each time, so fresh noise), runs the
same query through SmartNoise SQL over the same consenting rows with the same
contribution bound and the same total ε per query, and compares both with the
exact answer computed from the raw file (no clipping: the error a user sees).

    python3 -m venv /tmp/snvenv && /tmp/snvenv/bin/pip install smartnoise-sql pyarrow
    FG_BIN=$CARGO_TARGET_DIR/release/frostglass /tmp/snvenv/bin/python benches/utility_vs_smartnoise.py [RUNS] [SCALE]

Prints a Markdown table (for BENCHMARKS.md) and one JSON line per query.
"""
import http.client, json, os, shutil, socket, subprocess, sys, tempfile, time

import pandas as pd
import pyarrow.parquet as pq
import snsql
from snsql import Privacy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("FG_BIN", os.path.join(REPO, "target", "release", "frostglass"))
PURPOSE = "public_health_research"
EPSILON, DELTA, MAX_ROWS = 0.5, 1e-6, 20  # city_health's manifest

# name, SQL (Frostglass and SmartNoise alike), group key columns.
SUITE = [
    ("count by district", "SELECT district, COUNT(*) AS v FROM city_health GROUP BY district", ["district"]),
    ("count by (district, age)", "SELECT district, age, COUNT(*) AS v FROM city_health GROUP BY district, age", ["district", "age"]),
    ("persons by district", "SELECT district, COUNT(DISTINCT person_id) AS v FROM city_health GROUP BY district", ["district"]),
    ("sum of cost by district", "SELECT district, SUM(cost) AS v FROM city_health GROUP BY district", ["district"]),
    ("mean cost by district", "SELECT district, AVG(cost) AS v FROM city_health GROUP BY district", ["district"]),
    ("count by gender", "SELECT gender, COUNT(*) AS v FROM city_health GROUP BY gender", ["gender"]),
]


def run(args, cwd):
    out = subprocess.run([BIN] + args, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(args)} failed: {out.stderr[-400:]}")
    return (out.stdout.strip().splitlines() or [""])[-1]


class Sandbox:
    def __init__(self, scale):
        self.dir = tempfile.mkdtemp(prefix="fg-utility-")
        for d in ("catalog", "policies"):
            shutil.copytree(os.path.join(REPO, d), os.path.join(self.dir, d),
                            ignore=shutil.ignore_patterns("*.parquet", "*.csv"))
        data = os.path.join(self.dir, "data")
        run(["demo-data", "--catalog", "catalog", "--scale", str(scale)], self.dir)
        self.key = run(["principal", "add", "buyer:bench", "--role", "buyer", "--org", "bench",
                        "--region", "CN", "--data-dir", data], self.dir)
        run(["grant", "add", "--buyer", "buyer:bench", "--dataset", "city_health", "--purpose", PURPOSE,
             "--epsilon", "1000", "--queries-per-day", "100000", "--data-dir", data], self.dir)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0)); self.port = s.getsockname()[1]
        self.log = open(os.path.join(self.dir, "server.log"), "w")
        self.proc = subprocess.Popen([BIN, "serve", "--listen", f"127.0.0.1:{self.port}", "--catalog", "catalog",
                                      "--policies", "policies", "--data-dir", data],
                                     cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(600):
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200: return
            except OSError:
                pass
            time.sleep(0.5)
        sys.exit("the server did not start")

    def query(self, sql):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        c.request("POST", "/v1/queries", json.dumps({"sql": sql}),
                  {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
        r = c.getresponse(); doc = json.loads(r.read())
        if r.status != 200: sys.exit(f"{sql}: {r.status} {doc}")
        return doc

    def close(self):
        self.proc.terminate(); self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def smartnoise_reader(df, epsilon_per_query):
    meta = {"": {"": {"city_health": {
        "row_privacy": False, "max_ids": MAX_ROWS, "censor_dims": True,
        "person_id": {"type": "int", "private_id": True},
        "district": {"type": "string"}, "gender": {"type": "string"},
        "age": {"type": "int", "lower": 0, "upper": 110},
        "cost": {"type": "float", "lower": 0, "upper": 50000},
    }}}}

    def reader(eps):
        return snsql.from_df(df, privacy=Privacy(epsilon=eps, delta=DELTA), metadata=meta)

    # SmartNoise's ε is per mechanism; scale it so each query's total cost is ours.
    def for_query(sql):
        cost, _ = reader(1.0).get_privacy_cost(sql)
        eps = epsilon_per_query / cost
        r = reader(eps)
        spent, _ = r.get_privacy_cost(sql)
        assert abs(spent - epsilon_per_query) < 1e-9, (sql, spent)
        return r
    return for_query


def errors(released, truth, keys):
    """Per truth group: absolute error (a group missing from the release counts its whole value)."""
    out = []
    for key, t in truth.items():
        v = released.get(key)
        out.append((abs((0.0 if v is None else v) - t), t, v is not None))
    return out


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    scale = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    sb = Sandbox(scale)
    try:
        df = pq.read_table(os.path.join(sb.dir, "catalog", "data", "city_health.parquet")).to_pandas()
        df = df[df.consented_purposes.str.contains(f",{PURPOSE},")][["person_id", "district", "age", "gender", "cost"]]
        sn_for = smartnoise_reader(df, EPSILON)
        print(f"| query | groups | Frostglass MAE | SmartNoise MAE | Frostglass groups released | SmartNoise groups released | Frostglass worst rel. error (share of runs all ≤ 5%) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, sql, keys in SUITE:
            agg = sql.split("SELECT ")[1].split(" AS v")[0].split(", ")[-1]
            exact = df.groupby(keys).agg(
                v=("person_id", "nunique") if "DISTINCT" in agg else
                  ("cost", "sum") if agg.startswith("SUM") else
                  ("cost", "mean") if agg.startswith("AVG") else ("person_id", "size"))
            truth = {tuple(k if isinstance(k, tuple) else (k,)): float(v) for k, v in exact["v"].items()}
            fg_err, sn_err, fg_rel, fg_ok = [], [], [], 0
            fg_released = sn_released = 0
            sn = sn_for(sql)
            for run_k in range(runs):
                doc = sb.query(f"SELECT * FROM ({sql}) AS run_{run_k}")
                fg = {tuple(r[:-1]): float(r[-1]) for r in doc["rows"]}
                rows = sn.execute(sql)
                snd = {tuple(r[:-1]): float(r[-1]) for r in rows[1:] if r[-1] is not None}
                fe, se = errors(fg, truth, keys), errors(snd, truth, keys)
                fg_err += [e for e, _, _ in fe]; sn_err += [e for e, _, _ in se]
                fg_released += sum(1 for k in truth if k in fg); sn_released += sum(1 for k in truth if k in snd)
                rel = max(e / t for e, t, _ in fe if t > 0)
                fg_rel.append(rel); fg_ok += rel <= 0.05
            mae = lambda xs: sum(xs) / len(xs)
            n = len(truth)
            line = {"query": name, "groups": n, "runs": runs, "epsilon": EPSILON,
                    "frostglass_mae": round(mae(fg_err), 2), "smartnoise_mae": round(mae(sn_err), 2),
                    "frostglass_released": fg_released / runs, "smartnoise_released": sn_released / runs,
                    "frostglass_worst_rel_median": round(sorted(fg_rel)[len(fg_rel) // 2], 4),
                    "frostglass_runs_all_within_5pct": fg_ok}
            print(f"| {name} | {n} | {line['frostglass_mae']} | {line['smartnoise_mae']} | "
                  f"{line['frostglass_released']:.0f} | {line['smartnoise_released']:.1f} | "
                  f"{100 * line['frostglass_worst_rel_median']:.1f}% ({fg_ok}/{runs}) |", flush=True)
            print(json.dumps(line), file=sys.stderr, flush=True)
    finally:
        sb.close()


if __name__ == "__main__":
    main()
