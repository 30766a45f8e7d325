"""What the Python end-to-end tests share: the binary under test, running its
commands, a free port, a demo work folder, a server started and waited for,
and checks that print what they hold."""
import http.client, os, shutil, socket, subprocess, sys, tempfile, time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("FG_BIN", os.path.join(REPO, "target", "debug", "frostglass"))


def run(args, cwd):
    """`frostglass ARGS` in `cwd`; its last line of output (a key, an id)."""
    out = subprocess.run([BIN] + args, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"frostglass {' '.join(args)}: {out.stderr[-400:]}")
    return (out.stdout.strip().splitlines() or [""])[-1]


def free_port():
    return free_ports(1)[0]


def free_ports(n):
    """`n` free ports, all held until all are known, so none comes twice."""
    held = [socket.socket() for _ in range(n)]
    try:
        for s in held:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def demo_folder(prefix, scale):
    """A work folder with the repository's manifests and policies and fresh
    demo data at `scale`: (folder, its data directory)."""
    work = tempfile.mkdtemp(prefix=prefix)
    for d in ("catalog", "policies"):
        shutil.copytree(os.path.join(REPO, d), os.path.join(work, d),
                        ignore=shutil.ignore_patterns("*.parquet", "*.csv"))
    run(["demo-data", "--catalog", "catalog", "--scale", str(scale)], work)
    return work, os.path.join(work, "data")


def serve(work, data, port, extra=()):
    """`frostglass serve` on `port`, Flight SQL on a free port unless `extra`
    says otherwise; returns once /healthz answers."""
    log = open(os.path.join(work, "server.log"), "a")
    flight = [] if "--flight-listen" in extra else ["--flight-listen", "127.0.0.1:0"]
    server = subprocess.Popen([BIN, "serve", "--listen", f"127.0.0.1:{port}", "--catalog", "catalog",
                               "--policies", "policies", "--data-dir", data, *flight, *extra],
                              cwd=work, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(240):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return server
        except OSError:
            pass
        if server.poll() is not None:
            sys.exit("the server exited: " + open(log.name).read()[-600:])
        time.sleep(0.5)
    sys.exit("the server did not start")


class Checks:
    """`checks(ok, what)` fails the run on the first check that does not hold."""

    def __init__(self):
        self.held = []

    def __call__(self, ok, what):
        self.held.append(what)
        if not ok:
            raise AssertionError(what)
        print(f"ok  {what}", flush=True)
