#!/usr/bin/env python3
"""Flight SQL through the standard Python driver (ADBC: adbc-driver-flightsql
with adbc-driver-manager and pyarrow), against the real server: a released
aggregate equals the HTTP answer for a threshold release and is consistent
with it under differential privacy; adbc_get_objects lists only granted
tables; refusals carry the same stable codes and rules as HTTP.

    FG_BIN=target/debug/frostglass python tests/flight/adbc.py
"""
import http.client, json, os, sys

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness import Checks, demo_folder, free_ports, run, serve  # noqa: E402

PURPOSE = "public_health_research"
check = Checks()


def http_query(port, key, sql):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", "/v1/queries", body=json.dumps({"sql": sql}),
              headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    r = c.getresponse()
    return r.status, json.loads(r.read())


def connect(flight_port, key):
    return flightsql.connect(f"grpc://127.0.0.1:{flight_port}",
                             db_kwargs={"adbc.flight.sql.authorization_header": f"Bearer {key}"})


def refusal(conn, sql):
    """The JSON error body of a refused statement."""
    cur = conn.cursor()
    try:
        cur.execute(sql)
        cur.fetch_arrow_table()
    except adbc_driver_manager.Error as e:
        text = str(e)
        start = text.find('{"error"')
        return json.loads(text[start:text.rindex("}") + 1]) if start >= 0 else {"raw": text}
    finally:
        cur.close()
    return None


def main():
    work, data = demo_folder("fg-adbc-", 0.05)
    keys = {}
    for pid in ("buyer:a", "buyer:b"):
        keys[pid] = run(["principal", "add", pid, "--role", "buyer", "--org", pid.split(":")[1],
                         "--region", "CN", "--data-dir", data], work)
    run(["grant", "add", "--buyer", "buyer:a", "--purpose", PURPOSE, "--dataset", "city_health",
         "--dataset", "enterprise_registry", "--epsilon", "1000", "--data-dir", data], work)
    port, flight_port = free_ports(2)
    server = serve(work, data, port, ["--flight-listen", f"127.0.0.1:{flight_port}"])
    try:
        key = keys["buyer:a"]
        conn = connect(flight_port, key)

        # A threshold release: exactly HTTP's answer.
        sql = "SELECT industry, COUNT(*) AS n FROM enterprise_registry GROUP BY industry ORDER BY industry"
        cur = conn.cursor()
        cur.execute(sql)
        table = cur.fetch_arrow_table()
        cur.close()
        status, answer = http_query(port, key, sql)
        assert status == 200, answer
        check(table.column_names == [c["name"] for c in answer["columns"]], "ADBC: the columns are HTTP's")
        check([list(r.values()) for r in table.to_pylist()] == answer["rows"],
              f"ADBC: a threshold release equals the HTTP answer ({table.num_rows} rows)")

        # Differential privacy: two noisy answers of the same counts agree
        # within the noise both carry (here exactly: the second door gets the
        # release the first one stored, at no charge, whichever came first).
        sql = "SELECT district, COUNT(*) AS n FROM city_health GROUP BY district ORDER BY district"
        cur = conn.cursor()
        cur.execute(sql)
        noisy = {r["district"]: r["n"] for r in cur.fetch_arrow_table().to_pylist()}
        cur.close()
        status, answer = http_query(port, key, sql)
        assert status == 200, answer
        over_http = {r[0]: r[1] for r in answer["rows"]}
        noise = answer["release"]["noise"]
        scale = max(c["scale"] for c in noise["columns"])
        bound = 10 * scale * 2 ** 0.5
        worst = max(abs(noisy[d] - over_http[d]) for d in over_http)
        check(set(noisy) == set(over_http) and scale > 0 and worst <= bound,
              f"ADBC: DP counts agree with HTTP's within the noise (worst {worst}, bound {bound:.0f})")

        # Only granted tables are listed.
        objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
        tables = sorted(t["table_name"] for c in objects for s in (c["catalog_db_schemas"] or [])
                        for t in (s["db_schema_tables"] or []))
        check(tables == ["city_health", "enterprise_registry"], f"ADBC: get_objects lists the granted tables {tables}")
        other = connect(flight_port, keys["buyer:b"])
        objects = other.adbc_get_objects(depth="tables").read_all().to_pylist()
        check(not any(s["db_schema_tables"] for c in objects for s in (c["catalog_db_schemas"] or [])),
              "ADBC: a buyer without grants sees no table")

        # The same refusals as HTTP, code and rule.
        for sql, code, rule in (("SELECT * FROM city_health", "policy_violation", "aggregation_required"),
                                ("CREATE TABLE t (a INT)", "statement_not_allowed", None),
                                ("SELECT COUNT(*) FROM no_such_table", "unknown_table", None)):
            body = refusal(conn, sql)
            _, over_http = http_query(port, key, sql)
            got = (body or {}).get("error", {})
            check(got.get("code") == code == over_http["error"]["code"]
                  and got.get("details", {}).get("rule") == rule == over_http["error"]["details"].get("rule"),
                  f"ADBC: {sql!r} is refused with {code}" + (f"/{rule}" if rule else ""))
        conn.close()
        other.close()
        check(server.poll() is None, "the server stayed up")
        print(f"adbc: {len(check.held)} checks passed")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
