#!/usr/bin/env python3
"""The suite of `frostglass bench --flight` through the clients a Python
buyer uses, side by side against one server: HTTP with the standard library
(http.client on a kept-alive connection, the answer parsed with json) and
Flight SQL with ADBC (adbc-driver-flightsql, the answer fetched as an Arrow
table). The doors alternate statement by statement; each statement runs
under a grant of its own, so every answer is computed, none comes from the
answer store. Prints the median milliseconds per query and door.

    FG_BIN=target/release/frostglass python benches/drivers.py [SCALE] [RUNS]

Needs adbc-driver-flightsql and pyarrow (`.ci/run` installs them into
/tmp/frostglass-adbc-venv); the demo data is generated at SCALE (default 1)
into a temporary folder.
"""
import http.client, json, os, statistics, sys, time

import adbc_driver_flightsql.dbapi as flightsql

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from harness import demo_folder, free_ports, run, serve  # noqa: E402

PURPOSE = "public_health_research"
DATASETS = ("city_health", "telecom_usage", "enterprise_registry")
# The suite and the wide answers of `frostglass bench --flight` (src/cli/bench.rs, bench_flight.rs).
QUERIES = (
    ("grouped_count", "SELECT district, COUNT(*) AS n FROM city_health GROUP BY district"),
    ("sum_avg_two_keys", "SELECT district, gender, SUM(cost) AS total, AVG(cost) AS mean "
                         "FROM city_health GROUP BY district, gender"),
    ("join_on_person", "SELECT c.district, COUNT(DISTINCT c.person_id) AS persons, AVG(t.calls) AS calls "
                       "FROM city_health c JOIN telecom_usage t ON c.person_id = t.person_id GROUP BY c.district"),
    ("selective_filter", "SELECT district, COUNT(*) AS n FROM city_health WHERE age > 85 GROUP BY district"),
    ("high_cardinality", "SELECT district, age, visit_date, COUNT(*) AS n FROM city_health "
                         "GROUP BY district, age, visit_date"),
    ("wide_open_rows", "SELECT company_id, name, district, industry, employees FROM enterprise_registry LIMIT 5000"),
    ("wide_dp_groups", "SELECT district, age, COUNT(*) AS n FROM city_health GROUP BY district, age"),
)


def unbounded_budgets(work):
    """As the Rust bench does: no cap on released groups, and a lifetime
    budget that many fresh computations cannot spend."""
    folder = os.path.join(work, "catalog")
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if not name.endswith(".json"):
            continue
        with open(path) as f:
            manifest = json.load(f)
        release = manifest.get("release")
        if release is not None:
            release["max_groups"] = 10_000_000
            if "dp" in release:
                release["dp"]["epsilon_total"] = 1e12
        with open(path, "w") as f:
            json.dump(manifest, f)


def over_http(conn, key, grant, sql):
    """One statement over HTTP, its JSON answer read and parsed: rows."""
    conn.request("POST", "/v1/queries", body=json.dumps({"sql": sql, "grant": grant}),
                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    response = conn.getresponse()
    answer = json.loads(response.read())
    if response.status != 200:
        sys.exit(f"HTTP {response.status}: {answer}")
    return len(answer["rows"])


def datasets(conn, key):
    conn.request("GET", "/v1/datasets", headers={"Authorization": f"Bearer {key}"})
    conn.getresponse().read()


def over_flight(conn, grant, sql):
    """One statement over Flight SQL as the DB-API runs it: `execute`
    prepares it (`CreatePreparedStatement`) and asks for it
    (`GetFlightInfo`), `fetch_arrow_table` redeems its ticket (`DoGet`) to
    the last batch, `close` closes it (`ClosePreparedStatement`). Rows,
    and the milliseconds of each of the three."""
    cursor = conn.cursor()
    cursor.adbc_statement.set_options(**{"adbc.flight.sql.rpc.call_header.x-frostglass-grant": grant})
    marks = [time.perf_counter()]
    cursor.execute(sql)
    marks.append(time.perf_counter())
    rows = cursor.fetch_arrow_table().num_rows
    marks.append(time.perf_counter())
    cursor.close()
    marks.append(time.perf_counter())
    return rows, [(b - a) * 1000 for a, b in zip(marks, marks[1:])]


def median_ms(f, times=30):
    """The median milliseconds of `f()` after a warm-up."""
    f()
    spent = []
    for _ in range(times):
        started = time.perf_counter()
        f()
        spent.append((time.perf_counter() - started) * 1000)
    return statistics.median(spent)


def main():
    scale = float(sys.argv[1]) if len(sys.argv) > 1 else 1
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    work, data = demo_folder("fg-drivers-", scale)
    unbounded_budgets(work)
    key = run(["principal", "add", "buyer:bench", "--role", "buyer", "--org", "bench",
               "--region", "CN", "--data-dir", data], work)
    grant_args = ["grant", "add", "--buyer", "buyer:bench", "--purpose", PURPOSE, "--epsilon", "1000000",
                  "--data-dir", data] + [a for d in DATASETS for a in ("--dataset", d)]
    port, flight_port = free_ports(2)
    server = serve(work, data, port, ["--flight-listen", f"127.0.0.1:{flight_port}"])
    try:
        web = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        flight = flightsql.connect(f"grpc://127.0.0.1:{flight_port}",
                                   db_kwargs={"adbc.flight.sql.authorization_header": f"Bearer {key}"})
        print(f"{'query':<18} {'rows':>7} {'http ms':>9} {'adbc ms':>9} {'adbc/http':>10}"
              f" {'execute':>8} {'fetch':>7} {'close':>7}")
        for name, sql in QUERIES:
            http_ms, adbc_ms, phases = [], [], []
            rows = 0
            # One warm-up each, then the doors alternate; each statement a
            # plan of its own under a fresh grant.
            for i in range(runs + 1):
                grants = [run(grant_args, work) for _ in range(2)]
                started = time.perf_counter()
                n = over_http(web, key, grants[0], f"SELECT * FROM ({sql}) AS run_{i}")
                spent = (time.perf_counter() - started) * 1000
                m, steps = over_flight(flight, grants[1], f"SELECT * FROM ({sql}) AS flight_{i}")
                rows = max(n, m)
                if i > 0:
                    http_ms.append(spent)
                    adbc_ms.append(sum(steps))
                    phases.append(steps)
            h, f = statistics.median(http_ms), statistics.median(adbc_ms)
            steps = [statistics.median(p[k] for p in phases) for k in range(3)]
            print(f"{name:<18} {rows:>7} {h:>9.2f} {f:>9.2f} {f / h:>10.2f}"
                  + "".join(f" {s:>7.2f}" for s in steps), flush=True)
        # What the client costs by itself: a cursor (an ADBC statement)
        # opened and closed, which calls nothing; a catalog call, which
        # the server answers in microseconds; HTTP's list of datasets.
        print("the clients alone (ms):"
              f" ADBC cursor opened and closed {median_ms(lambda: flight.cursor().close()):.2f};"
              f" ADBC GetTableTypes (GetFlightInfo + DoGet) {median_ms(flight.adbc_get_table_types):.2f};"
              f" HTTP GET /v1/datasets {median_ms(lambda: datasets(web, key)):.2f}")
        flight.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
