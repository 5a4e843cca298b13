# SPDX-License-Identifier: MIT
"""kvtierctl against a live kvtierd: every subcommand in both output forms, the errors
(no daemon, stale socket, a user the daemon refuses, a user who may look but not
change), the Prometheus endpoint parsed and cross-checked (and given to promtool where
it is installed), and the maintenance jobs checked to lose nothing: after flush, evict
and drain, sparse attention over every page still equals dense attention.

usage: test_kvtierctl.py BUILD_DIR SOURCE_DIR
"""
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

build, src = sys.argv[1], sys.argv[2]
# A sanitized libkvtier inside python: its runtimes must be loaded first (and python's
# own allocations are not ours to report), as in test_binding.sh.
if "KVT_SAN_PRELOADED" not in os.environ:
    ldd = subprocess.run(["ldd", os.path.join(build, "libkvtier.so")], capture_output=True,
                         text=True).stdout
    san = [l.split()[2] for l in ldd.splitlines() if ("libasan" in l or "libubsan" in l)
           and len(l.split()) > 2]
    if san:
        env = dict(os.environ, KVT_SAN_PRELOADED="1", LD_PRELOAD=":".join(san),
                   ASAN_OPTIONS="detect_leaks=0")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
sys.path.insert(0, os.path.join(src, "ipc", "python"))
try:
    import numpy as np
except ImportError:
    if os.path.exists("/usr/bin/python3") and sys.executable != "/usr/bin/python3":
        os.execv("/usr/bin/python3", ["/usr/bin/python3"] + sys.argv)  # Debian's, with numpy
    print("numpy missing: skip")
    sys.exit(77)
import kvtier  # noqa: E402

# children (kvtierctl, kvtierd: linked with their sanitizers if any) without the preload
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
CTL = os.path.join(build, "tools", "kvtierctl")
DAEMON = os.path.join(build, "kvtierd")
if not os.path.exists(CTL):
    print("kvtierctl not built (no jansson): skip")
    sys.exit(77)
os.environ["KVTIER_LIB"] = os.path.join(build, "libkvtier.so")

failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


def ctl(*args, sock=None, user=None, expect=0):
    cmd = [CTL, "-s", sock or SOCK] + [str(a) for a in args]
    if user is not None:
        cmd = ["setpriv", "--reuid", str(user), "--regid", str(user), "--clear-groups"] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=CHILD_ENV)
    if expect is not None and r.returncode != expect:
        print(f"  {' '.join(str(a) for a in args)} -> rc {r.returncode}\n  stdout: {r.stdout[-2000:]}\n"
              f"  stderr: {r.stderr[-2000:]}")
    check(expect is None or r.returncode == expect,
          f"kvtierctl {' '.join(str(a) for a in args)}: exit {r.returncode}")
    return r


def ctl_json(*args, **kw):
    r = ctl("--json", *args, **kw)
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError:
        check(False, f"kvtierctl --json {' '.join(args)}: JSON out")
        return None


def dense(K, V, q, scale):
    s = (q @ K.T.astype(np.float32)) * scale
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return p @ V.astype(np.float32)


def parse_prometheus(text):
    """The text exposition format: {name: {labels-tuple: value}}, TYPE per family."""
    samples, types = {}, {}
    line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})? (\S+)$')
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(" ", 3)
            types[name] = typ
            continue
        if not line or line.startswith("#"):
            continue
        m = line_re.match(line)
        if not m:
            raise ValueError(f"bad sample line: {line!r}")
        labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or "")))
        samples.setdefault(m.group(1), {})[labels] = float(m.group(4))
    return samples, types


# ---- no daemon, stale socket ----
tmp = tempfile.mkdtemp(prefix="kvtierctl-")
os.chmod(tmp, 0o755)
SOCK = os.path.join(tmp, "run", "kvtierd.sock")
r = ctl("status", expect=1)
check("not running" in r.stderr and "no socket" in r.stderr, "no daemon: says so")
os.makedirs(os.path.dirname(SOCK), mode=0o755)
s = socket.socket(socket.AF_UNIX)
s.bind(SOCK)
s.close()
r = ctl("status", expect=1)
check("stale socket" in r.stderr, "stale socket: says so")
os.unlink(SOCK)

# ---- the daemon ----
state = os.path.join(tmp, "state")
log = open(os.path.join(tmp, "kvtierd.log"), "w")
daemon = subprocess.Popen([DAEMON, "-o", f"ipc.socket={SOCK}", "-o", f"store.state_dir={state}",
                           "-o", f"store.device={os.environ.get('KVT_TEST_DEVICE', 'cpu')}",
                           "-o", "tenant.gpu_bytes=16M", "-o", "tenant.host_bytes=16M",
                           "-o", "store.nvme_bytes=256M", "-o", "metrics.listen=127.0.0.1:0",
                           "-o", "ipc.socket_mode=0666"], stdout=log, stderr=log, env=CHILD_ENV)
try:
    for _ in range(200):
        if os.path.exists(SOCK):
            break
        time.sleep(0.05)
    st = ctl_json("status")
    check(st["clients"] == 0 and [t["tier"] for t in st["tiers"]] == ["gpu", "host", "nvme"],
          "status --json: no clients, three tiers")
    check(st["pid"] == daemon.pid and st["version"], "status --json: pid and version")
    r = ctl("status")
    check("kvtierd" in r.stdout and "TIER" in r.stdout and "nvme" in r.stdout, "status: table")

    # ---- a client with two sequences, decoding a few steps ----
    L, H, G, D, T = 2, 2, 2, 64, 64
    n = 40 * T + 17  # 40 full pages in the store; the daemon keeps the last 17 tokens
    NP = 2 * L * H * 40
    rng = np.random.default_rng(7)
    c = kvtier.Client(L, H, G, D, dtype="f16", page_tokens=T, dense_layers=0, socket=SOCK,
                      data_bytes=32 << 20)
    seqs = [c.seq_create(), c.seq_create()]
    K = rng.standard_normal((2, L, n, H, D)).astype(np.float16)
    V = rng.standard_normal((2, L, n, H, D)).astype(np.float16)
    for i, sq in enumerate(seqs):
        for l in range(L):
            c.append(sq, l, K[i, l], V[i, l])

    def attend_all(i, l):
        """Sparse attention with a budget over every page: must equal dense attention."""
        q = rng.standard_normal((H * G, D)).astype(np.float16)
        t = c.select([seqs[i]], l, q, budget_pages=64, sink_tokens=T, window_tokens=T)
        out = c.attend(t, q).astype(np.float64)
        err = 0.0
        for h in range(H):
            ref = dense(K[i, l, :, h], V[i, l, :, h], q[h * G:(h + 1) * G].astype(np.float32),
                        D ** -0.5)
            err = max(err, np.abs(out[h * G:(h + 1) * G] - ref).max() / np.abs(ref).max())
        return err

    for step in range(3):
        for l in range(L):
            for i in range(2):
                q = rng.standard_normal((H * G, D)).astype(np.float16)
                c.select([seqs[i]], l, q, budget_pages=4, sink_tokens=T, window_tokens=T)
    check(max(attend_all(i, l) for i in range(2) for l in range(L)) < 0.01,
          "before the jobs: sparse over every page = dense")

    st = ctl_json("status")
    check(st["clients"] == 1 and st["sequences"] >= 2 and st["pages"] == NP,
          f"status: 1 client, {NP} pages (got {st['pages']})")

    cl = ctl_json("clients")
    check(len(cl) == 1 and cl[0]["layout"]["layers"] == L and cl[0]["layout"]["head_dim"] == D
          and cl[0]["sequences"] == 2 and cl[0]["tokens"] == 2 * n and cl[0]["selects"] > 0,
          "clients --json: layout, sequences, tokens, selects")
    cid = cl[0]["id"]
    r = ctl("clients")
    check(re.search(rf"^\s*{cid}\s", r.stdout, re.M) is not None and "2x2x64 fp16" in r.stdout,
          "clients: table row")

    sq = ctl_json("seqs", "--client", cid)
    check(len(sq) == 2 and all(x["tokens"] == n and x["pages"] == L * H * 40 for x in sq),
          "seqs --json: tokens and pages of each")
    check(all(x["pages_nvme"] == L * H * 40 for x in sq), "seqs --json: full pages are on NVMe")
    r = ctl("seqs")
    check(len([l for l in r.stdout.splitlines() if re.match(rf"\s*{cid}\s", l)]) == 2, "seqs: table")

    # named sequences: one held open by this client, one closed
    ns, _ = c.seq_open("ctl/open", create=True)
    nc, _ = c.seq_open("ctl/closed", create=True)
    for l in range(L):
        kk = np.zeros((3 * T, H, D), np.float16)
        c.append(ns, l, kk, kk)
        c.append(nc, l, kk, kk)
    c.seq_close(nc)
    nm = {x["name"]: x for x in ctl_json("names")}
    check(set(nm) == {"ctl/open", "ctl/closed"}, "names --json: both names")
    check(nm["ctl/open"]["open"] and nm["ctl/open"].get("client") == cid
          and nm["ctl/open"]["tokens"] == 3 * T and nm["ctl/open"]["pages"] == 3 * L * H,
          "names --json: the open one, its client, tokens and pages")
    check(not nm["ctl/closed"]["open"] and nm["ctl/closed"]["tokens"] == 3 * T
          and nm["ctl/closed"]["pages"] == 3 * L * H, "names --json: the closed one keeps its pages")
    r = ctl("names")
    check("ctl/closed" in r.stdout and f"client {cid}" in r.stdout, "names: table")
    c.seq_close(ns)
    c.seq_remove("ctl/open")
    c.seq_remove("ctl/closed")
    check(ctl_json("names") == [], "names --json: removed")

    pg = ctl_json("pages", "--client", cid, "--seq", sq[0]["seq"])
    check(pg["matched"] == L * H * 40 and len(pg["pages"]) == L * H * 40 and not pg["truncated"],
          "pages --client --seq: every page")
    check(sorted((p["layer"], p["head"], p["page"]) for p in pg["pages"]) ==
          [(l, h, i) for l in range(L) for h in range(H) for i in range(40)]
          and all(p["state"] == "clean" and "nvme" in p["tiers"] for p in pg["pages"]),
          "pages: every (layer, head, page) once, written back")
    pg = ctl_json("pages", "--tier", "nvme", "--layer", 1, "--limit", 5)
    check(pg["matched"] == 2 * H * 40 and len(pg["pages"]) == 5 and pg["truncated"]
          and all(p["layer"] == 1 and "nvme" in p["tiers"] for p in pg["pages"]),
          "pages --tier --layer --limit: filtered and cut")
    r = ctl("pages", "--client", cid, "--limit", 3)
    check("pages matched (list cut at --limit)" in r.stdout, "pages: table and cut note")
    ctl("pages", "--client", 9999, expect=1)
    r = ctl("pages", "--client", cid, "--seq", 12345, expect=1)
    check("no sequence" in r.stderr, "pages: unknown sequence is an error")
    r = ctl("pages", "--seq", 1, expect=1)
    check("needs client" in r.stderr, "pages: --seq without --client is an error")

    tiers = ctl_json("tiers")
    nv = tiers[2]
    check(nv["tier"] == "nvme" and nv["write_bytes"] >= 2 * L * H * 40 * 2 * T * D * 2
          and nv["write_latency"]["count"] >= 2 * L * H * 40 and nv["write_latency"]["p50"] > 0,
          "tiers --json: NVMe writes and their latency")
    check(set(nv["errors_by_reason"]) == {"io", "short", "checksum", "stale", "empty"}
          and set(nv["evictions"]) == {"watermark", "room", "request", "stale"},
          "tiers --json: errors and evictions by reason")
    r = ctl("tiers")
    check("RD P50" in r.stdout and "nvme" in r.stdout, "tiers: table")

    sj = ctl_json("stats")
    check(sj["prefetch"]["steps"] >= 3 * L * 2 and sj["prefetch"]["selected"] > 0
          and sj["select_latency"]["count"] >= 3 * L * 2 and sj["store"]["pages"] == NP,
          "stats --json: steps, selections, store")
    r = ctl("stats")
    check("select:" in r.stdout and "prefetch:" in r.stdout, "stats: summary")

    # ---- Prometheus: CLI text and HTTP endpoint ----
    prom = ctl("stats", "--prometheus").stdout
    samples, types = parse_prometheus(prom)
    check(all(n.startswith("kvtier_") for n in samples), "prometheus: kvtier_ prefix")
    check(all(not (t == "counter") or n.endswith("_total") for n, t in types.items()),
          "prometheus: counters end in _total")
    check(samples["kvtier_tier_capacity_bytes"][(("tier", "nvme"),)] == 256 << 20,
          "prometheus: nvme capacity")
    check(samples["kvtier_clients"][()] == 1, "prometheus: clients gauge")
    check(samples["kvtier_tenant_pages"][(("tenant", "0"),)] == NP
          and [t["pages"] for t in sj["tenants"]] == [NP], "tenant pages: prometheus and JSON")
    hb = samples["kvtier_copy_duration_seconds_bucket"]
    cnt = samples["kvtier_copy_duration_seconds_count"][(("op", "write"), ("tier", "nvme"))]
    check(hb[(("le", "+Inf"), ("op", "write"), ("tier", "nvme"))] == cnt and cnt > 0,
          "prometheus: histogram +Inf bucket = count")
    les = sorted(float(dict(k)["le"]) for k in hb if dict(k)["tier"] == "nvme"
                 and dict(k)["op"] == "write" and dict(k)["le"] != "+Inf")
    vals = [hb[(("le", repr_le), ("op", "write"), ("tier", "nvme"))] for repr_le in
            [k[0][1] for k in sorted((k for k in hb if dict(k)["tier"] == "nvme" and
                                      dict(k)["op"] == "write" and dict(k)["le"] != "+Inf"),
                                     key=lambda k: float(dict(k)["le"]))]]
    check(vals == sorted(vals), "prometheus: buckets cumulative")
    hurried = samples["kvtier_hurried_read_duration_seconds_count"][()]
    check(hurried == samples["kvtier_hurried_read_disk_seconds_count"][()]
          == sj["store"]["hurried_read_latency"]["count"]
          <= samples["kvtier_store_reads_hurried_total"][()]
          and (("le", "+Inf"),) in samples["kvtier_page_reuse_gap_seconds_bucket"],
          "prometheus: hurried reads' and pages' histograms, as stats --json")
    sel = samples["kvtier_select_pages_total"]
    check(sum(v for k, v in sel.items() if ("client", str(cid)) in k) == sj["prefetch"]["selected"],
          "prometheus: selected pages = stats --json")
    addr = ctl_json("status")["metrics"]
    have_mhd = "#define HAVE_MHD 1" in open(os.path.join(build, "kvtier_config.h")).read()
    check(addr is None if not have_mhd else addr.startswith("127.0.0.1:"),
          f"metrics endpoint at {addr}")
    body = prom if not have_mhd else None
    if not have_mhd:
        print("built without libmicrohttpd: the HTTP checks skipped")
    else:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as resp:
            body = resp.read().decode()
            ctype = resp.headers["Content-Type"]
        check(ctype.startswith("text/plain; version=0.0.4"), "HTTP: exposition content type")
        hs, _ = parse_prometheus(body)
        check(hs["kvtier_tier_capacity_bytes"] == samples["kvtier_tier_capacity_bytes"]
              and hs["kvtier_store_pages"] == samples["kvtier_store_pages"], "HTTP = CLI text")
        try:
            urllib.request.urlopen(f"http://{addr}/nothing", timeout=10)
            check(False, "HTTP: 404 elsewhere")
        except urllib.error.HTTPError as e:
            check(e.code == 404, "HTTP: 404 elsewhere")
    promtool = shutil.which("promtool")
    if promtool:
        p = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                           text=True, env=CHILD_ENV)
        print(p.stdout, p.stderr)
        check(p.returncode == 0, "promtool check metrics")
    else:
        print("promtool not installed: its check skipped")

    # ---- config ----
    cfg = ctl_json("config", "get")
    names = {o["name"]: o for o in cfg}
    check("prefetch.gpu_margin_pct" in names and names["prefetch.gpu_margin_pct"]["reloadable"]
          and not names["store.page_bytes"]["reloadable"], "config get: every option")
    r = ctl("config", "get", "prefetch.gpu_margin_pct")
    check(r.stdout.strip() == "prefetch.gpu_margin_pct = 100", "config get NAME")
    r = ctl("config", "set", "prefetch.gpu_margin_pct", "50")
    check("= 50 (was 100)" in r.stdout, "config set: applied, old value shown")
    check(ctl_json("config", "get", "prefetch.gpu_margin_pct")[0]["value"] == "50",
          "config set: visible")
    r = ctl("config", "set", "store.page_bytes", "64K", expect=1)
    check("only at start" in r.stderr, "config set: start-only option refused")
    r = ctl("config", "set", "no.such", "1", expect=1)
    check("no such option" in r.stderr, "config set: unknown option")
    r = ctl("config", "set", "prefetch.gpu_margin_pct", "banana", expect=1)
    check("prefetch.gpu_margin_pct" in r.stderr, "config set: bad value")
    ctl("config", "get", "no.such", expect=1)

    # ---- jobs ----
    r = ctl("evict", expect=1)
    check("tier" in r.stderr, "evict: needs a tier")
    r = ctl("drain", "--tier", "nvme", expect=1)
    check("last tier" in r.stderr, "drain nvme: refused")
    j = ctl_json("flush")
    check(j["op"] == "flush" and j["state"] == "done" and j["failed"] == 0, "flush: done")
    check(ctl_json("status")["pages_dirty"] == 0, "flush: no dirty page left")
    # the last selection's pins hold its pages in place: make them few
    for l in range(L):
        for i in range(2):
            q = rng.standard_normal((H * G, D)).astype(np.float16)
            c.select([seqs[i]], l, q, budget_pages=1, sink_tokens=T, window_tokens=T)
    PINNED = 2 * L * H * 3
    s0 = [x for x in ctl_json("seqs", "--client", cid) if x["seq"] == sq[0]["seq"]][0]
    j = ctl_json("evict", "--tier", "host", "--client", cid, "--seq", sq[0]["seq"])
    s1 = [x for x in ctl_json("seqs", "--client", cid) if x["seq"] == sq[0]["seq"]][0]
    check(j["state"] == "done" and j["failed"] == 0 and j["total"] == s0["pages_host"]
          and j["done"] > 0 and s1["pages_host"] <= j["skipped"] <= PINNED // 2,
          f"evict host of one sequence: {j}")
    other = [x for x in ctl_json("seqs", "--client", cid) if x["seq"] == sq[1]["seq"]][0]
    check(other["pages_host"] == [x for x in sq if x["seq"] == sq[1]["seq"]][0]["pages_host"]
          or other["pages_host"] > 0, "evict: the other sequence keeps its host copies")
    r = ctl("drain", "--tier", "gpu")
    check("drain gpu done" in r.stdout, "drain gpu: summary line")
    jj = ctl_json("job")
    gpu_left = ctl_json("status")["tiers"][0]["pages"]
    check(jj["op"] == "drain" and jj["failed"] == 0 and gpu_left <= jj["skipped"] <= PINNED,
          f"drain gpu: {gpu_left} pages left, {jj['skipped']} skipped (pinned)")
    j = ctl_json("drain", "--tier", "host")
    host_left = ctl_json("status")["tiers"][1]["pages"]
    check(j["failed"] == 0 and host_left <= j["skipped"] <= PINNED and j["done"] > 0,
          f"drain host: {host_left} left ({j['skipped']} skipped: pinned)")
    r = ctl("job")
    check(r.stdout.startswith("job ") and "drain host done" in r.stdout, "job: last job")
    r = ctl("cancel")
    check("done" in r.stdout, "cancel: nothing running")
    check(ctl_json("job")["op"] == "drain" and ctl_json("cancel")["state"] == "done",
          "job --json, cancel --json")
    r = ctl("flush")
    check(re.search(r"^job \d+: flush done: \d+ of \d+ pages done", r.stdout, re.M) is not None,
          "flush: summary line")
    r = ctl("evict", "--tier", "gpu", "--client", cid, "--no-wait")
    check(re.search(r"^job \d+: evict gpu (running|done)", r.stdout, re.M) is not None,
          "evict --no-wait: returns with the job")
    err = max(attend_all(i, l) for i in range(2) for l in range(L))
    check(err < 0.01, f"after flush, evict and drain: sparse over every page = dense ({err:.4f})")
    sj = ctl_json("stats")
    check(sj["tiers"][0]["evictions"]["request"] > 0, "evictions by request counted")
    check(sj["attention_latency"]["count"] >= 4 and sj["attention_latency"]["p50"] > 0,
          "the clients' attention time reaches the stats")

    # ---- malformed control messages: an error answer or a hang-up, never a crash ----
    import re
    import struct
    wire = open(os.path.join(src, "ipc", "wire.h")).read()
    check(int(re.search(r"define KVT_WIRE_VERSION (\d+)", wire).group(1)) == kvtier.WIRE_VERSION,
          "the Python binding's WIRE_VERSION is ipc/wire.h's")

    def raw(payload, typ=8):
        s = socket.socket(socket.AF_UNIX)
        s.connect(SOCK)
        s.sendall(struct.pack("<IHHIi", kvtier.WIRE_MAGIC, kvtier.WIRE_VERSION, typ, len(payload), 0) + payload)
        s.settimeout(10)
        out, status = b"", None
        try:
            while True:
                h = s.recv(16, socket.MSG_WAITALL)
                if len(h) < 16:
                    break
                magic, ver, t, ln, status = struct.unpack("<IHHIi", h)
                out += s.recv(ln, socket.MSG_WAITALL) if ln else b""
                if status != 1:
                    break
        finally:
            s.close()
        return status, out

    st_, out = raw(b"status")  # the last word without its NUL
    check(st_ == 0 and json.loads(out)["clients"] == 1, "raw: a word without NUL")
    st_, out = raw(b"\xff" * 60000)
    check(st_ == -22 and b"unknown command" in out, "raw: junk is an unknown command")
    st_, out = raw(b"pages\0client=abc\0")
    check(st_ == -22, "raw: a bad number is EINVAL")
    st_, out = raw(b"\0" * 40000)
    check(st_ == -22, "raw: only NULs")
    st_, out = raw(b"stats\0" + b"x=y\0" * 5000)
    check(st_ == 0 and "store" in json.loads(out), "raw: too many words are cut, not trusted")
    s2 = socket.socket(socket.AF_UNIX)
    s2.connect(SOCK)
    s2.sendall(struct.pack("<IHHIi", kvtier.WIRE_MAGIC, kvtier.WIRE_VERSION, 8, 7, 0) + b"status\0")
    s2.recv(1 << 16)
    s2.sendall(struct.pack("<IHHIi", kvtier.WIRE_MAGIC, kvtier.WIRE_VERSION, 1, 96, 0) + b"\0" * 96)  # HELLO now
    s2.settimeout(10)
    check(s2.recv(1 << 16) == b"", "raw: HELLO on a control connection hangs up")
    s2.close()
    check(ctl_json("status")["clients"] == 1, "raw: the daemon and the client are unharmed")

    # ---- top ----
    r = ctl("top", "--iterations", 2, "--interval", 0.2)
    check(r.stdout.count("TIER") >= 4 and r.stdout.count("kvtierctl top") == 2, "top: two frames")

    # ---- help and usage errors ----
    for sub in ("status", "tiers", "clients", "seqs", "pages", "stats", "config", "evict", "drain",
                "flush", "job", "cancel", "top", "plan"):
        r = ctl(sub, "--help")
        check(r.stdout.startswith("kvtierctl") or r.stdout.startswith("usage"), f"{sub} --help")
    ctl("frobnicate", expect=2)
    ctl("status", "--bogus", expect=2)

    # ---- other users ----
    if os.geteuid() == 0 and shutil.which("setpriv"):
        nobody = pwd.getpwnam("nobody").pw_uid
        r = ctl("status", user=nobody, expect=1)
        check("refused" in r.stderr and "not allowed" in r.stderr, "a user not allowed: refused")
        ctl("config", "set", "ipc.allow_uids", str(nobody))
        st = ctl_json("status", user=nobody)
        check(st["clients"] == 1, "an allowed user: may look")
        r = ctl("flush", user=nobody, expect=1)
        check("only root" in r.stderr, "an allowed user: may not flush")
        r = ctl("config", "set", "prefetch.enable", "false", user=nobody, expect=1)
        check("only root" in r.stderr, "an allowed user: may not set options")
        os.chmod(os.path.dirname(SOCK), 0o700)
        r = ctl("status", user=nobody, expect=1)
        check("permission denied" in r.stderr, "no access to the socket: says so")
        os.chmod(os.path.dirname(SOCK), 0o755)
    else:
        print("not root (or no setpriv): the other-user cases skipped")

    # ---- plan ----
    p = ctl_json("plan", "--model", "llama-3.1-8b", "--context", 131072, "--sessions", 4)
    check(p["kv"]["per_session_bytes"] == 16 << 30 and p["kv"]["total_bytes"] == 64 << 30,
          "plan: Llama-3.1-8B at 128K is 16 GiB a session")
    check(p["hit_rates"]["from"].startswith("observed"), "plan: the daemon's hit rates")
    g = ctl_json("plan", "--model", "llama-3.1-8b", "--context", 131072, "--sessions", 4,
                 "--hit-gpu", 0.95, "--hit-host", 0.04, "--hit-disk", 0.01)
    sel = 4 * 32 * 8 * (2048 // 64 + 1 + 2)
    check(g["hit_rates"]["from"] == "given" and abs(g["step_bytes"]["nvme"] - 0.01 * sel * 32768) < 1,
          "plan: per-step bytes from NVMe = selected pages x disk rate")
    check(0 < g["step_seconds"]["floor"] < g["step_seconds"]["dense_hbm"], "plan: floor below dense")
    check(p["tiers_bytes"]["nvme"] > p["kv"]["total_bytes"], "plan: NVMe holds everything")
    png = os.path.join(tmp, "plan.png")
    gp = shutil.which("gnuplot")
    r = ctl("plan", "--layers", 80, "--kv-heads", 8, "--head-dim", 128, "--context", "1M",
            "--sessions", 1, "--hit-gpu", 0.9, "--hit-host", 0.09, "--hit-disk", 0.01,
            "--plot", png, expect=0 if gp else 1)
    check("step-time floor" in r.stdout and "given" in r.stdout, "plan: table, given rates")
    if gp:
        check(open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n", "plan --plot: a PNG")
    else:
        check("gnuplot" in r.stderr, "plan --plot without gnuplot: says so")
    ctl("plan", "--model", "nosuch", "--context", 1, "--sessions", 1, expect=2)
    ctl("plan", "--model", "qwen2.5-7b", expect=2)

    c.close()
    daemon.send_signal(signal.SIGTERM)
    check(daemon.wait(timeout=60) == 0, "daemon stops cleanly")
    p = ctl_json("plan", "--model", "qwen2.5-7b", "--context", 32768, "--sessions", 8)
    check(p["hit_rates"]["from"].startswith("assumed")
          and p["kv"]["per_session_bytes"] == 32768 * 28 * 4 * 2 * 128 * 2,
          "plan without a daemon: assumed rates; Qwen2.5-7B KV")
finally:
    if daemon.poll() is None:
        daemon.kill()
        daemon.wait()
    log.close()
    if failures:
        print(open(os.path.join(tmp, "kvtierd.log")).read()[-4000:])
    if not os.environ.get("KVT_KEEP"):
        shutil.rmtree(tmp, ignore_errors=True)

print(f"{len(failures)} failures")
sys.exit(1 if failures else 0)
