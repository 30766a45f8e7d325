#!/usr/bin/env python3
"""The web console in a real browser (Debian's chromium, driven through
chromedriver by Selenium): each role signs in, the numbers on its page are
compared with the API's answers to the same principal, an owner approves a
held answer and an access request in the page, and the attacks the console
must stop are tried: a buyer's cookie on the auditor view, a cross-site form
post, a tampered ledger entry. Screenshots of each view go to
$FG_ARTIFACTS (default /tmp/frostglass-artifacts); --update-docs also
copies them into docs/.

    FG_BIN=target/debug/frostglass python3 tests/console/run.py
"""
import base64, http.client, http.server, json, os, shutil, sqlite3, sys, tempfile, threading, time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives import serialization
from selenium import webdriver
from selenium.common.exceptions import SessionNotCreatedException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness import REPO, Checks, demo_folder, free_port, run, serve  # noqa: E402

ARTIFACTS = os.environ.get("FG_ARTIFACTS", "/tmp/frostglass-artifacts")
PURPOSE = "public_health_research"
check = Checks()


class Api:
    def __init__(self, port):
        self.port = port

    def call(self, method, path, key=None, body=None, headers=None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        h = dict(headers or {})
        if key:
            h["Authorization"] = f"Bearer {key}"
        data = None
        if body is not None:
            data = json.dumps(body)
            h["Content-Type"] = "application/json"
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        text = r.read().decode()
        try:
            doc = json.loads(text) if text else None
        except ValueError:
            doc = None
        return r.status, doc, r.getheaders()

    def get(self, path, key):
        status, doc, _ = self.call("GET", path, key)
        assert status == 200, f"GET {path}: {status} {doc}"
        return doc


# Chromium's profiles, removed when the test ends.
PROFILES = tempfile.mkdtemp(prefix="fg-chromium-")


def browser():
    # Chromium now and then exits while starting on a busy machine (CI saw
    # "session not created: Chrome instance exited"): a fresh profile and
    # another try, a few times, before the test gives up.
    for attempt in range(3):
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,2000",
                    "--disable-gpu", f"--user-data-dir={tempfile.mkdtemp(dir=PROFILES)}"):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        try:
            return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                                    options=options)
        except SessionNotCreatedException:
            if attempt == 2:
                raise
            time.sleep(2)


def console_errors(driver):
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def sign_in(driver, base, key):
    driver.delete_all_cookies()
    driver.get(f"{base}/console/")
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#sign-in button[type=submit]").click()
    wait_ready(driver)


def wait_ready(driver):
    try:
        WebDriverWait(driver, 30).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "main[data-ready=true]")
            or d.find_elements(By.CSS_SELECTOR, "main .error"))
    except Exception:
        logs = "; ".join(e["message"] for e in driver.get_log("browser"))
        raise AssertionError(f"{driver.current_url} never got ready: {driver.find_element(By.TAG_NAME, 'body').text[:600]} | console: {logs}")
    errors = driver.find_elements(By.CSS_SELECTOR, "main .error")
    assert not errors, "the page shows an error: " + "; ".join(e.text for e in errors)


def table_rows(driver, table_id):
    """Each row of a console table as {field: exact value}."""
    rows = []
    for tr in driver.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr"):
        row = {}
        for td in tr.find_elements(By.CSS_SELECTOR, "td[data-field]"):
            row[td.get_attribute("data-field")] = td.get_attribute("data-value")
        rows.append(row)
    return rows


def exact(value):
    """A JSON value as the page keeps it in data-value."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def same_rows(shown, expected, fields, what):
    want = sorted(tuple(exact(r.get(f)) for f in fields) for r in expected)
    got = sorted(tuple(r.get(f, "") for f in fields) for r in shown)
    check(want == got and len(want) > 0, f"{what}: {len(got)} rows equal the API's")


def screenshot(driver, name):
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, f"console-{name}.png")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(height, 800) + 40, 8000))
    driver.save_screenshot(path)
    driver.set_window_size(1280, 2000)
    print(f"    screenshot {path}")
    return path


def main():
    update_docs = "--update-docs" in sys.argv
    work, data = demo_folder("fg-console-", 0.02)
    # Every answer on city_health waits for its owner's review here.
    manifest_path = os.path.join(work, "catalog", "city_health.json")
    manifest = json.load(open(manifest_path))
    manifest["release"]["review"] = True
    json.dump(manifest, open(manifest_path, "w"), indent=2)
    keys = {}
    for pid, role, org in (("owner:hospital", "owner", "hospital"), ("buyer:a", "buyer", "buyer-a"),
                           ("buyer:b", "buyer", "buyer-b"), ("auditor:x", "auditor", "audit-x")):
        keys[pid] = run(["principal", "add", pid, "--role", role, "--org", org, "--region", "CN",
                         "--data-dir", data], work)
    run(["grant", "add", "--buyer", "buyer:a", "--purpose", PURPOSE, "--dataset", "city_health",
         "--dataset", "power_grid", "--epsilon", "50", "--queries-per-day", "100", "--data-dir", data], work)
    run(["grant", "add", "--buyer", "buyer:b", "--purpose", PURPOSE, "--dataset", "city_health",
         "--epsilon", "20", "--queries-per-day", "40", "--data-dir", data], work)
    port = free_port()
    server = serve(work, data, port)
    base = f"http://127.0.0.1:{port}"
    api = Api(port)
    owner, buyer_a, buyer_b, auditor = (keys[k] for k in ("owner:hospital", "buyer:a", "buyer:b", "auditor:x"))
    driver = None
    attacker = None
    try:
        # Traffic: held answers on city_health, answers on power_grid, refusals.
        held = []
        for key, sql in ((buyer_a, "SELECT district, COUNT(*) FROM city_health GROUP BY district"),
                         (buyer_a, "SELECT gender, COUNT(*) FROM city_health GROUP BY gender"),
                         (buyer_b, "SELECT district, COUNT(*) FROM city_health GROUP BY district")):
            status, doc, _ = api.call("POST", "/v1/queries", key, {"sql": sql, "purpose": PURPOSE})
            assert status == 202, (status, doc)
            held.append(doc["query_id"])
        for sql in ("SELECT hour, COUNT(*) FROM power_grid GROUP BY hour",
                    "SELECT district, COUNT(*) FROM power_grid GROUP BY district"):
            status, doc, _ = api.call("POST", "/v1/queries", buyer_a, {"sql": sql, "purpose": PURPOSE})
            assert status == 200, (status, doc)
        for key in (buyer_a, buyer_b, buyer_b):
            status, doc, _ = api.call("POST", "/v1/queries", key,
                                      {"sql": "SELECT * FROM city_health", "purpose": PURPOSE})
            assert status == 403, (status, doc)
        # buyer:b asks for more: a signed access request waits for the hospital.
        signing = Ed25519PrivateKey.generate()
        raw = signing.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        status, added, _ = api.call("POST", "/v1/principals/me/signing-keys", buyer_b,
                                    {"public_key": base64.b64encode(raw).decode()})
        assert status == 201, (status, added)
        status, request, _ = api.call("POST", "/v1/access-requests", buyer_b, {
            "datasets": ["city_health"], "purpose": PURPOSE,
            "period": {"from": "2026-01-01T00:00:00Z", "to": "2030-01-01T00:00:00Z"},
            "quotas": {"queries_per_day": 100}, "epsilon": 5.0})
        assert status == 201, (status, request)
        signature = signing.sign(base64.b64decode(request["to_sign"]))
        status, signed, _ = api.call("POST", f"/v1/access-requests/{request['id']}/commitment", buyer_b,
                                     {"key_id": added["key_id"], "signature": base64.b64encode(signature).decode()})
        assert status == 200 and signed["status"] == "pending", (status, signed)

        # Every response carries the policy; the sign-in page is served with it.
        status, _, headers = api.call("GET", "/console/")
        csp = dict((k.lower(), v) for k, v in headers).get("content-security-policy", "")
        check(status == 200 and "script-src 'self'" in csp and "unsafe-inline" not in csp
              and "frame-ancestors 'none'" in csp, "the CSP header forbids inline script and other origins")

        driver = browser()

        # --- owner ------------------------------------------------------------------
        sign_in(driver, base, owner)
        check(driver.current_url.endswith("/console/owner"), "the owner lands on the owner view")
        cookie = driver.get_cookie("fg_session")
        check(cookie and cookie["httpOnly"] and cookie.get("sameSite") == "Strict",
              "the session cookie is HttpOnly and SameSite=Strict")
        check(not driver.execute_script("return document.cookie").count("fg_session"),
              "the page's script cannot read the session cookie")
        mine = api.get("/v1/datasets?mine=true", owner)["datasets"]
        same_rows(table_rows(driver, "datasets"), [
            {"id": d["id"], "rows": d["rows"], "lifetime_epsilon.spent": (d["lifetime_epsilon"] or {}).get("spent"),
             "lifetime_epsilon.limit": (d["lifetime_epsilon"] or {}).get("limit")} for d in mine],
            ["id", "rows", "lifetime_epsilon.spent", "lifetime_epsilon.limit"], "owner: my datasets")
        report = api.get("/v1/datasets/city_health/usage", owner)
        shown_usage = [r for r in table_rows(driver, "usage") if r["dataset"] == "city_health"]
        same_rows(shown_usage, report["usage"], ["day", "principal", "grant", "queries_answered", "queries_refused",
                                                  "epsilon", "charge"], "owner: use of city_health per buyer and day")
        burn = driver.find_element(By.CSS_SELECTOR, ".burn-down[data-dataset=city_health]")
        life = report["lifetime_epsilon"]
        for field in ("remaining", "limit", "pace_per_day", "projected_exhaustion"):
            value = burn.find_element(By.CSS_SELECTOR, f"[data-field={field}]").get_attribute("data-value")
            check(value == exact(life[field]), f"owner: lifetime ε {field} {value} equals the API's")
        check(life["projected_exhaustion"] is not None and len(life["by_day"]) >= 1,
              "owner: ε spent today projects an exhaustion date")
        check(len(burn.find_elements(By.CSS_SELECTOR, "svg circle")) == len(life["by_day"]),
              "owner: the burn-down chart has one point per day of the API's series")
        same_rows(table_rows(driver, "refusals"), api.get("/v1/refusals?days=30", owner)["refusals"],
                  ["day", "code", "rule", "count"], "owner: refusals by rule")
        waiting = api.get("/v1/reviews", owner)["waiting"]
        shown_reviews = [a.get_attribute("data-query") for a in driver.find_elements(By.CSS_SELECTOR, "#reviews .review")]
        check(sorted(shown_reviews) == sorted(w["query_id"] for w in waiting) == sorted(held),
              "owner: the review queue lists the held answers")
        check(not console_errors(driver), "owner view: no console errors")
        screenshot(driver, "owner")

        # Approve an answer in the page: its buyer then receives it.
        status, before, _ = api.call("GET", f"/v1/queries/{held[0]}", buyer_a)
        check(status == 200 and before.get("status") == "held", "the buyer's answer waits before review")
        driver.find_element(By.CSS_SELECTOR, f"button.approve-answer[data-query='{held[0]}']").click()
        WebDriverWait(driver, 30).until(lambda d: not d.find_elements(
            By.CSS_SELECTOR, f".review[data-query='{held[0]}']"))
        wait_ready(driver)
        status, after, _ = api.call("GET", f"/v1/queries/{held[0]}", buyer_a)
        check(status == 200 and after.get("query_id") == held[0] and len(after.get("rows", [])) > 0,
              "after the owner approves in the page, the buyer receives the answer")

        # Approve buyer:b's request with a narrower ε.
        row = driver.find_element(By.CSS_SELECTOR, f"button.approve-request[data-request='{request['id']}']")
        box = row.find_element(By.XPATH, "..")
        box.find_element(By.CSS_SELECTOR, "input.narrow-epsilon").send_keys("2")
        row.click()
        WebDriverWait(driver, 30).until(lambda d: not d.find_elements(
            By.CSS_SELECTOR, f"button.approve-request[data-request='{request['id']}']"))
        decided = api.get(f"/v1/access-requests/{request['id']}", buyer_b)
        grant = [g for g in api.get("/v1/grants", buyer_b)["grants"] if g["grant"]["id"] == decided.get("grant")]
        check(decided["status"] == "approved" and grant and grant[0]["budget"]["epsilon_limit"] == 2,
              "the owner approves a request in the page, narrowing ε to 2")

        # A cross-site form post: another origin's page posts to the API with the
        # owner's cookie riding along (another port is the same site).
        page = (f"<form id=f method=post action='{base}/v1/reviews/{held[1]}/approve'>"
                "<input name=x value=1></form><script>document.getElementById('f').submit()</script>")

        class Evil(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(page.encode())

            def log_message(self, *_):
                pass

        attacker = http.server.HTTPServer(("127.0.0.1", 0), Evil)
        threading.Thread(target=attacker.serve_forever, daemon=True).start()
        driver.get(f"http://127.0.0.1:{attacker.server_address[1]}/")
        WebDriverWait(driver, 30).until(
            lambda d: d.current_url.startswith(base) and d.find_element(By.TAG_NAME, "body").text.strip())
        body = driver.find_element(By.TAG_NAME, "body").text
        check("csrf_rejected" in body, "a cross-site form post is refused (csrf_rejected)")
        still = [w["query_id"] for w in api.get("/v1/reviews", owner)["waiting"]]
        check(held[1] in still, "the answer the forged form tried to approve still waits")
        # A script on that origin cannot do better: it cannot read the token.
        driver.get(f"{base}/console/owner")
        wait_ready(driver)
        forged = driver.execute_script(
            "return fetch(arguments[0], {method: 'POST', credentials: 'same-origin'}).then(r => r.status)",
            f"/v1/reviews/{held[1]}/reject")
        check(forged == 403, "a state change without the CSRF token is refused even from the console origin")
        driver.get_log("browser")  # the refusals above are expected console errors

        # --- buyer --------------------------------------------------------------------
        sign_in(driver, base, buyer_a)
        check(driver.current_url.endswith("/console/buyer"), "the buyer lands on the buyer view")
        grants = api.get("/v1/grants", buyer_a)["grants"]
        same_rows(table_rows(driver, "grants"), [
            {"grant.id": g["grant"]["id"], "remaining_today.queries": g["remaining_today"]["queries"],
             "budget.epsilon_remaining": g["budget"]["epsilon_remaining"],
             "budget.epsilon_limit": g["budget"]["epsilon_limit"]} for g in grants],
            ["grant.id", "remaining_today.queries", "budget.epsilon_remaining", "budget.epsilon_limit"],
            "buyer: grants, quotas left today and ε left")
        history = api.get("/v1/queries?limit=100", buyer_a)["queries"]
        same_rows(table_rows(driver, "history"), history, ["query_id", "decision", "rule", "epsilon", "charge"],
                  "buyer: query history")
        links = driver.find_elements(By.CSS_SELECTOR, "#history a.receipt")
        answered = [q for q in history if q["decision"] == "answered"]
        check(len(links) == len(answered) > 0, "buyer: every answered query has a receipt to download")
        receipt = driver.execute_script(
            "return fetch(arguments[0]).then(r => r.json())", links[0].get_attribute("href"))
        check(receipt.get("query_id") == links[0].get_attribute("href").rsplit("/", 1)[1]
              and receipt["head"]["signature"] and receipt["entries"] and receipt["entries"][0]["proof"] is not None,
              "buyer: the receipt link returns the signed evidence bundle of that query")
        check(not console_errors(driver), "buyer view: no console errors")
        screenshot(driver, "buyer")
        # The buyer's cookie does not open the auditor view, nor the auditors' API.
        driver.get(f"{base}/console/auditor")
        # The page asks who is signed in before it renders: wait for either outcome.
        WebDriverWait(driver, 30).until(
            lambda d: d.find_elements(By.ID, "refused") or d.find_elements(By.ID, "ledger-head"))
        check(driver.find_elements(By.ID, "refused") and not driver.find_elements(By.ID, "ledger-head"),
              "a buyer's cookie cannot open the auditor view")
        status = driver.execute_script("return fetch('/v1/audit/head').then(r => r.status)")
        check(status == 403, "a buyer's cookie cannot call the auditors' API")
        driver.get_log("browser")

        # --- auditor ------------------------------------------------------------------
        sign_in(driver, base, auditor)
        check(driver.current_url.endswith("/console/auditor"), "the auditor lands on the auditor view")
        head = api.get("/v1/audit/head", auditor)
        shown_size = driver.find_element(By.CSS_SELECTOR, "#ledger-head [data-field=tree_size]").get_attribute("data-value")
        check(shown_size == str(head["tree_size"]), f"auditor: ledger size {shown_size} equals the API's")
        driver.find_element(By.ID, "verify-now").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "dl#verification [data-field=ok]"))
        wait_ready(driver)
        last = api.get("/v1/audit/verify", auditor)["last"]
        ok = driver.find_element(By.CSS_SELECTOR, "#verification [data-field=ok]").get_attribute("data-value")
        check(ok == "true" and last["ok"] is True, "auditor: the ledger verifies, as the API says")
        same_rows(table_rows(driver, "all-usage"), api.get("/v1/usage", auditor)["usage"],
                  ["day", "principal", "grant", "queries_answered", "queries_refused", "epsilon", "charge"],
                  "auditor: usage across all grants")
        month = time.strftime("%Y-%m", time.gmtime())
        statement = api.get(f"/v1/settlements?period={month}", auditor)
        total = driver.find_element(By.CSS_SELECTOR, "#settlement [data-field=total]").get_attribute("data-value")
        check(total == statement["total"], f"auditor: settlement total {total} equals the API's")
        same_rows(table_rows(driver, "settlement-lines"), statement["lines"], ["grant", "buyer", "owner", "total"],
                  "auditor: settlement lines")
        same_rows(table_rows(driver, "refusals"), api.get("/v1/refusals?days=30", auditor)["refusals"],
                  ["day", "code", "rule", "count"], "auditor: refusals by rule")
        sql = "SELECT principal, decision, COUNT(*) AS n FROM usage GROUP BY principal, decision"
        box = driver.find_element(By.ID, "audit-sql")
        box.clear()
        box.send_keys(sql)
        driver.find_element(By.ID, "run-sql").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#audit-table tbody tr"))
        result = api.call("POST", "/v1/audit/sql", auditor, {"sql": sql})[1]
        same_rows(table_rows(driver, "audit-table"), [dict(zip(["principal", "decision", "n"], r)) for r in result["rows"]],
                  ["principal", "decision", "n"], "auditor: audit SQL results")
        check(not console_errors(driver), "auditor view: no console errors")
        screenshot(driver, "auditor")

        # A tampered entry: the server-side verification names it.
        db = sqlite3.connect(os.path.join(data, "frostglass.db"), timeout=30)
        db.execute("UPDATE usage_log SET body = replace(body, 'buyer:b', 'buyer:c') WHERE idx = "
                   "(SELECT MIN(idx) FROM usage_log WHERE body LIKE '%buyer:b%')")
        broken = db.execute("SELECT MIN(idx) FROM usage_log WHERE body LIKE '%buyer:c%'").fetchone()[0]
        db.commit()
        db.close()
        driver.find_element(By.ID, "verify-now").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "dl#verification.broken"))
        index = driver.find_element(By.CSS_SELECTOR, "#verification [data-field=broken_index]").get_attribute("data-value")
        check(index == str(broken), f"auditor: a tampered entry shows as broken at index {index}")
        screenshot(driver, "auditor-broken")
        driver.get_log("browser")

        # Sign-out ends the session on the server.
        driver.find_element(By.ID, "sign-out").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, "sign-in"))
        gone = driver.execute_script("return fetch('/console/session').then(r => r.status)")
        check(gone == 401, "after sign-out the session is gone")
        check(server.poll() is None, "the server stayed up")
        if update_docs:
            os.makedirs(os.path.join(REPO, "docs"), exist_ok=True)
            for name in ("owner", "buyer", "auditor"):
                shutil.copy(os.path.join(ARTIFACTS, f"console-{name}.png"),
                            os.path.join(REPO, "docs", f"console-{name}.png"))
        print(f"console: {len(check.held)} checks passed")
    except BaseException:
        if driver:
            screenshot(driver, "failure")
            print("    page text:", driver.find_element(By.TAG_NAME, "body").text[:3000])
        raise
    finally:
        if driver:
            driver.quit()
        shutil.rmtree(PROFILES, ignore_errors=True)
        if attacker:
            attacker.shutdown()
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
