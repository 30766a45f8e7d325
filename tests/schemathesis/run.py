#!/usr/bin/env python3
"""Schemathesis against the live server, once per role (buyer, owner,
auditor, admin), with every check, a fixed seed and a bounded number of
examples; exits non-zero on any failure. Documented exceptions live in
schemathesis.toml beside this file, each with its reason.

    FG_BIN=target/debug/frostglass SCHEMATHESIS=.venv/bin/schemathesis python3 tests/schemathesis/run.py
"""
import json, os, shutil, subprocess, sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness import demo_folder, free_port, run, serve  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ST = os.environ.get("SCHEMATHESIS", "schemathesis")
EXAMPLES = os.environ.get("ST_MAX_EXAMPLES", "25")
SEED = os.environ.get("ST_SEED", "20261130")
ROLES = ("buyer", "owner", "auditor", "admin")


def main():
    work, data = demo_folder("fg-schemathesis-", 0.02)
    keys = {}
    for role in ROLES:
        keys[role] = run(["principal", "add", f"{role}:st", "--role", role, "--org", f"st-{role}",
                          "--region", "CN", "--data-dir", data], work)
    run(["grant", "add", "--buyer", "buyer:st", "--purpose", "public_health_research",
         "--dataset", "city_health", "--dataset", "telecom_usage", "--dataset", "enterprise_registry",
         "--dataset", "power_grid", "--epsilon", "100000", "--queries-per-day", "10000000",
         "--data-dir", data], work)
    # Generated traffic is a flood by design: lift the per-principal rate limit.
    config = os.path.join(work, "config.json")
    json.dump({"limits": {"requests_per_second": 1e6, "request_burst": 1e6}}, open(config, "w"))
    port = free_port()
    server = serve(work, data, port, ["--config", config])
    base = f"http://127.0.0.1:{port}"
    try:
        failed = []
        for role in ROLES:
            print(f"== schemathesis as {role}", flush=True)
            code = subprocess.run(
                [ST, "--config-file", os.path.join(HERE, "schemathesis.toml"), "run", f"{base}/openapi.json",
                 "--header", f"Authorization: Bearer {keys[role]}", "--checks", "all",
                 "--seed", SEED, "--max-examples", EXAMPLES, "--workers", "2",
                 "--phases", "examples,coverage,fuzzing,stateful", "--no-color",
                 # Rotation revokes the very key this run authenticates with,
                 # and every later call would be 401 (tests/api/market.rs covers it).
                 "--exclude-path", "/v1/principals/me/keys/rotate"],
                cwd=work).returncode
            if code != 0:
                failed.append(role)
        if server.poll() is not None:
            sys.exit("the server died during the run: "
                     + open(os.path.join(work, "server.log")).read()[-400:])
        if failed:
            sys.exit(f"schemathesis failed for: {', '.join(failed)}")
        print("schemathesis: 0 failures for every role")
    finally:
        server.terminate()
        server.wait(10)
        if not os.environ.get("FG_KEEP"):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
