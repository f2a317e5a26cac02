#!/usr/bin/env python3
"""ContainerSSH benchmark driver. Run it through bench/run.sh, which builds the binaries,
installs OpenSSH's server if needed, builds the offline test image and exports BENCH_*.

Everything here talks to 127.0.0.1 only, every wait is bounded, and everything started is
stopped in `Bench.cleanup` (also on SIGINT/SIGTERM). See bench/README.md for what is
measured and why.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path


# --------------------------------------------------------------------------------------
# Settings (environment; run.sh documents them)
# --------------------------------------------------------------------------------------

def env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "").strip()
    return int(v) if v else default


RUN = os.environ.get("BENCH_RUN") or os.urandom(4).hex()
IMAGE = os.environ["BENCH_IMAGE"]
BIN = os.environ["BENCH_BIN"]
STATIC_BIN = os.environ.get("BENCH_STATIC_BIN", "")
# The static agent the server injects (built with the static binary); without one the server
# runs with the agent disabled and `sleep` as the idle command.
AGENT_BIN = os.environ.get("BENCH_AGENT_BIN", "")
SSHD = os.environ.get("BENCH_SSHD", "/usr/sbin/sshd")
USER = os.environ.get("BENCH_USER", "csshbench")
N_LAT = env_int("BENCH_N", 20)
N_TP = env_int("BENCH_TP_N", 3)
TP_BYTES = env_int("BENCH_TP_BYTES", 1 << 30)
K_SESS = env_int("BENCH_SESSIONS", 20)
PARALLEL = [int(x) for x in os.environ.get("BENCH_PARALLEL", "20 200").split()]
N_BREAK = env_int("BENCH_BREAKDOWN_N", 5)
# What writes the bytes inside the container, each measured in turn: busybox `head -c` (small
# writes: mostly measures the engine's stream path) and `dd bs=1M` (1 MiB writes: the transport).
TP_GENS = os.environ.get("BENCH_TP_GEN", "head dd").split()
PARALLEL_FC = os.environ.get("BENCH_PARALLEL_FC", "") == "1"
# docker.timeouts.http for our servers (e.g. "60s"); empty: the server's default (15 s).
HTTP_TIMEOUT = os.environ.get("BENCH_HTTP_TIMEOUT", "").strip()
KEEP = os.environ.get("BENCH_KEEP", "") == "1"
PIDFILE = os.environ.get("BENCH_PIDFILE", "")
# A warm pool of this many containers for an extra connection-mode variant in the latency phase.
POOL_SIZE = int(os.environ.get("BENCH_POOL", "2"))
# Also burst the parallel logins against a server with a pool as large as the largest burst.
PARALLEL_POOL = os.environ.get("BENCH_PARALLEL_POOL", "1") == "1"
# Rounds of the Kubernetes phase (`ssh HOST true` through the fake API server, cold and pooled).
N_KUBE = env_int("BENCH_KUBE_N", 10)
KUBEFAKE = Path(__file__).resolve().parent.parent / "tests" / "support" / "kubefake" / "kubefake.py"
# Also measure recorded sessions (audit, binary and asciinema) in the throughput phase.
AUDIT_TP = os.environ.get("BENCH_AUDIT", "1") == "1"
PHASES = [p.strip() for p in os.environ.get(
    "BENCH_PHASES", "binary,latency,breakdown,throughput,memory,parallel,kube").split(",") if p.strip()]

CIPHER = "aes128-gcm@openssh.com"
KEX = "curve25519-sha256"
BENCH_LABEL = f"containerssh_bench={RUN}"
GECOS = f"containerssh bench {RUN}"

# Timeouts (seconds): every external command and wait has one.
T_LOGIN = 120
T_THROUGHPUT = 600
T_PARALLEL = 300
T_SETTLE = 120


def say(msg: str = "") -> None:
    print(msg, flush=True)


def progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------

def run(cmd, timeout=60, check=True, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("capture_output", True)
    r = subprocess.run(cmd, timeout=timeout, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{shlex.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def scrape(port: int, name: str) -> float:
    """One unlabelled counter from a metrics endpoint: 0 when it has no sample yet (a family
    is listed without samples until its first count), NaN when the endpoint does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return 0.0
    except OSError:
        return float("nan")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def pct(xs, q):
    """Linear-interpolated percentile (q in 0..1)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = q * (len(s) - 1)
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def fmt(x, nd=1):
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    return f"{x:.{nd}f}"


def ratio(a, b, nd=2):
    if a is None or b is None or b == 0 or a != a or b != b:
        return "n/a"
    return f"{a / b:.{nd}f}x"


def proc_status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = v.strip()
    except OSError:
        pass
    return out


def kib(pid: int, key: str) -> int | None:
    v = proc_status(pid).get(key)
    return int(v.split()[0]) if v else None


def pss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def descendants(root: int) -> list[int]:
    """All live descendants of `root` (by PPid), from /proc."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_status(int(d))
            if "PPid" in st:
                parent[int(d)] = int(st["PPid"])
    out, frontier = [], {root}
    while frontier:
        nxt = {p for p, pp in parent.items() if pp in frontier}
        out.extend(nxt)
        frontier = nxt
    return out


def labelled_containers(label: str) -> list[str]:
    r = run(["docker", "ps", "-aq", "--filter", f"label={label}"], timeout=60, check=False)
    return r.stdout.split()


def wait_no_containers(label: str, timeout: float = T_SETTLE) -> bool:
    """Bounded poll (100 ms) until no container carries `label`."""
    deadline = time.monotonic() + timeout
    while True:
        if not labelled_containers(label):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def parse_ts(s: str) -> int | None:
    """RFC 3339 UTC timestamp ('...T..:..:..[.frac]Z') -> ns since the epoch."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:?\d\d)$", s)
    if not m:
        return None
    base = dt.datetime.fromisoformat(m.group(1) + ("+00:00" if m.group(3) == "Z" else m.group(3)))
    frac = (m.group(2) or "").ljust(9, "0")[:9]
    return int(base.timestamp()) * 1_000_000_000 + int(frac)


# --------------------------------------------------------------------------------------
# The servers
# --------------------------------------------------------------------------------------

class KubeFake:
    """The project's fake Kubernetes API server (pods become containers of the local engine),
    over TLS with a bearer token, and the agent's init image built from the static agent."""

    def __init__(self, bench: "Bench"):
        if not AGENT_BIN:
            raise RuntimeError("the Kubernetes phase needs the static agent (BENCH_AGENT_BIN)")
        d = bench.work / "kubefake"
        d.mkdir()
        self.dir = d
        (d / "srv.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", d / "ca.key",
             "-out", d / "ca.crt", "-days", "2", "-subj", "/CN=bench-kubefake-ca"])
        run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", d / "srv.key", "-out",
             d / "srv.csr", "-subj", "/CN=127.0.0.1"])
        run(["openssl", "x509", "-req", "-in", d / "srv.csr", "-CA", d / "ca.crt", "-CAkey", d / "ca.key",
             "-CAcreateserial", "-out", d / "srv.crt", "-days", "2", "-extfile", d / "srv.ext"])
        self.token = os.urandom(16).hex()
        self.log = open(d / "kubefake.log", "wb")
        self.proc = subprocess.Popen(
            ["python3", str(KUBEFAKE), "--listen", "127.0.0.1:0", "--prefix", f"kfb{RUN}",
             "--tls-cert", str(d / "srv.crt"), "--tls-key", str(d / "srv.key"), "--token", self.token],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log, text=True)
        bench.track(self.proc)
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(30)
        if not ready or not ready[0].startswith("listening on "):
            raise RuntimeError(f"kubefake did not start: {ready!r}\n{(d / 'kubefake.log').read_text()}")
        self.url = ready[0].split("listening on ", 1)[1].strip()
        self.ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
        self.init_image = self.build_init_image()

    @staticmethod
    def build_init_image() -> str:
        with open(AGENT_BIN, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:12]
        tag = f"containerssh-agent-init:{digest}"
        if run(["docker", "image", "inspect", tag], check=False).returncode == 0:
            return tag
        with tempfile.TemporaryDirectory(prefix="bench-agent-init-") as ctx:
            shutil.copy(AGENT_BIN, Path(ctx) / "containerssh-agent")
            os.chmod(Path(ctx) / "containerssh-agent", 0o755)
            (Path(ctx) / "Dockerfile").write_text(
                "FROM scratch\nCOPY containerssh-agent /usr/bin/containerssh-agent\n")
            run(["docker", "build", "-q", "-t", tag, ctx], timeout=300)
        return tag

    def backend_yaml(self, mode: str, pool: int) -> str:
        return f"""backend: kubernetes
kubernetes:
  connection:
    host: "{self.url}"
    cacertFile: "{self.dir / 'ca.crt'}"
    bearerToken: "{self.token}"
  pod:
    metadata:
      namespace: default
      labels:
        containerssh_bench_kube: "{RUN}"
    spec:
      containers:
        - name: shell
          image: "{IMAGE}"
    mode: {mode}
    shellCommand: ["/bin/sh"]
    agentInitImage: "{self.init_image}"
{f"    pool:{chr(10)}      size: {pool}{chr(10)}" if pool else ""}"""

    def pods(self, selector: str) -> list[dict]:
        q = urllib.parse.quote(selector, safe="")
        req = urllib.request.Request(f"{self.url}/api/v1/namespaces/default/pods?labelSelector={q}",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30, context=self.ctx) as r:
            return json.load(r).get("items", [])

    def settled(self, instance: str, pool: int, timeout: float) -> bool:
        """Bounded poll until `instance` has exactly `pool` pods, all waiting members, running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            every = self.pods(f"containerssh_instance={instance}")
            ready = [p for p in every if p["metadata"].get("labels", {}).get("containerssh_pool") == "1"
                     and p.get("status", {}).get("phase") == "Running"
                     and not p["metadata"].get("deletionTimestamp")]
            if len(every) == pool and len(ready) == pool:
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Ours:
    """One containerssh process with its own config, port, instance ID and log file."""

    def __init__(self, bench: "Bench", name: str, mode: str, level: str = "info", extra: str = "",
                 pool: int = 0, kube: "KubeFake | None" = None):
        self.bench = bench
        self.name = name
        self.instance = f"bench-{RUN}-{name}"
        self.port = free_port()
        self.log = bench.work / f"ours-{name}.log"
        cfg = bench.work / f"ours-{name}.yaml"
        w = bench.work
        if AGENT_BIN:
            agent_yaml, agent_top = "", f'agent:{chr(10)}  binary: "{AGENT_BIN}"{chr(10)}'
        else:
            agent_yaml = ('    idleCommand: ["/bin/sleep", "infinity"]' + chr(10)
                          + '    disableAgent: true' + chr(10))
            agent_top = ""
        backend = kube.backend_yaml(mode, pool) if kube else f"""backend: docker
docker:
  execution:
    container:
      image: "{IMAGE}"
      labels:
        {"containerssh_bench_pool" if pool else "containerssh_bench"}: "{RUN}"
    mode: {mode}
{f"    pool:{chr(10)}      size: {pool}{chr(10)}" if pool else ""}    imagePullPolicy: Never
    shellCommand: ["/bin/sh"]
{agent_yaml}{f'  timeouts:{chr(10)}    http: "{HTTP_TIMEOUT}"{chr(10)}' if HTTP_TIMEOUT else ''}"""
        cfg.write_text(f"""ssh:
  listen: 127.0.0.1:{self.port}
  hostkeys:
    - "{w}/ours_host_ed25519"
  ciphers: ["{CIPHER}"]
  kex: ["{KEX}"]
  # The same front door as the sshd beside it (MaxStartups 300:30:400): the parallel phase
  # logs in 200 clients at once from one address, which the defaults (10 per source) refuse.
  maxStartups: "300:30:400"
  perSourceMaxStartups: none
auth:
  publicKey:
    method: authorizedKeys
    authorizedKeys:
      path: "{w}/keys/%u"
{backend}log:
  level: {level}
  format: text
instanceId: "{self.instance}"
stateDirectory: "{w}/state-{name}"
# As root (the bench machine): uid 0 without capabilities; the seccomp filter is enforced.
sandbox:
  allowRoot: {"true" if os.geteuid() == 0 else "false"}
{agent_top}{extra}""")
        env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
        env["NO_COLOR"] = "1"
        self.logf = open(self.log, "wb")
        self.proc = subprocess.Popen([BIN, "--config", str(cfg)], stdin=subprocess.DEVNULL,
                                     stdout=self.logf, stderr=subprocess.STDOUT, env=env)
        bench.track(self.proc)
        deadline = time.monotonic() + 30
        while "listening on" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerssh ({name}) did not start:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self, samples: int = 5) -> int | None:
        vals = []
        for _ in range(samples):
            v = kib(self.pid, "VmRSS")
            if v is not None:
                vals.append(v)
            time.sleep(0.1)
        return int(median(vals)) if vals else None

    def label(self) -> str:
        return f"containerssh_instance={self.instance}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.logf.close()


class Sshd:
    """A second OpenSSH sshd on loopback: its own config, host key and authorized_keys.

    Port `plain`: a normal login. Port `fc`: `Match LocalPort` + ForceCommand docker run
    (default json-file logging, what an operator would write). Port `fcn`: the same with
    `--log-driver none` (reference for the throughput test only).
    """

    def __init__(self, bench: "Bench"):
        self.bench = bench
        d = bench.work / "sshd"
        d.mkdir()
        os.chmod(d, 0o755)
        self.plain, self.fc, self.fcn = free_port(), free_port(), free_port()
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench-sshd", "-f", str(d / "host_ed25519")])
        ak = d / "authorized_keys"
        ak.write_text(bench.client_pub + "\n")
        os.chmod(ak, 0o644)
        fc = (f'docker run --rm -i --label {BENCH_LABEL} {IMAGE} '
              'sh -c "${SSH_ORIGINAL_COMMAND:-sh}"')
        fcn = (f'docker run --rm -i --log-driver none --label {BENCH_LABEL} {IMAGE} '
               'sh -c "${SSH_ORIGINAL_COMMAND:-sh}"')
        self.forcecommand = fc
        self.config = d / "sshd_config"
        self.config.write_text(f"""# containerssh bench {RUN}: a private sshd, loopback only
ListenAddress 127.0.0.1
Port {self.plain}
Port {self.fc}
Port {self.fcn}
HostKey {d}/host_ed25519
PidFile none
UsePAM no
StrictModes no
PermitRootLogin no
AllowUsers {USER}
AuthorizedKeysFile {ak}
AuthorizedPrincipalsFile none
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
HostbasedAuthentication no
GSSAPIAuthentication no
Ciphers {CIPHER}
KexAlgorithms {KEX}
HostKeyAlgorithms ssh-ed25519
MaxStartups 300:30:400
MaxSessions 10
LoginGraceTime 120
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
AllowTcpForwarding no
PermitTunnel no
LogLevel INFO
Match LocalPort {self.fc}
    ForceCommand {fc}
Match LocalPort {self.fcn}
    ForceCommand {fcn}
""")
        run([SSHD, "-t", "-f", str(self.config)])
        self.log = bench.work / "sshd.log"
        self.logf = open(self.log, "wb")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                     stdin=subprocess.DEVNULL, stdout=self.logf, stderr=subprocess.STDOUT)
        bench.track(self.proc)
        deadline = time.monotonic() + 20
        while not all(port_open(p) for p in (self.plain, self.fc, self.fcn)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.05)

    def children_mem(self) -> tuple[int, int, int]:
        """(count, sum VmRSS KiB, sum Pss KiB) of the per-connection sshd processes."""
        n = rss = pss = 0
        for pid in descendants(self.proc.pid):
            st = proc_status(pid)
            if st.get("Name") == "sshd":
                n += 1
                rss += int(st.get("VmRSS", "0 kB").split()[0])
                pss += pss_kib(pid) or 0
        return n, rss, pss

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.logf.close()


# --------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------

class Bench:
    def __init__(self):
        self.work = Path(tempfile.mkdtemp(prefix=f"containerssh-bench-{RUN}-"))
        os.chmod(self.work, 0o755)  # the bench user must reach authorized_keys and its home
        self.tracked: list[subprocess.Popen] = []
        self.created_user = False
        self.servers: list = []
        self.summary: list[tuple[str, str, str]] = []  # (section, metric, value)
        self.results: dict = {}

    # -- bookkeeping ------------------------------------------------------------------
    def track(self, p: subprocess.Popen) -> None:
        self.tracked.append(p)
        if PIDFILE:
            with open(PIDFILE, "a") as f:
                f.write(f"{p.pid}\n")

    def add(self, section: str, metric: str, value: str) -> None:
        self.summary.append((section, metric, value))

    # -- set-up ---------------------------------------------------------------------
    def setup(self) -> None:
        w = self.work
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench-client", "-f", str(w / "client_ed25519")])
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench-ours", "-f", str(w / "ours_host_ed25519")])
        self.client_pub = (w / "client_ed25519.pub").read_text().strip()
        (w / "keys").mkdir()
        (w / "keys" / USER).write_text(self.client_pub + "\n")
        self.make_user()

    def make_user(self) -> None:
        """A throw-away system user for the sshd side: shell /bin/sh, member of `docker`.

        root is not used because its ~/.bashrc here runs `pyenv init` (bash sources it for
        ssh commands), which would add ~250 ms to every sshd login and flatter us."""
        home = self.work / "home"
        home.mkdir()
        r = run(["getent", "passwd", USER], check=False)
        if r.returncode == 0:
            gecos = r.stdout.split(":")[4]
            if not gecos.startswith("containerssh bench"):
                raise RuntimeError(f"user {USER} exists and is not ours (GECOS {gecos!r}); set BENCH_USER")
            run(["userdel", USER], check=False)  # a leftover from a killed run
        groups = ["-G", "docker"] if run(["getent", "group", "docker"], check=False).returncode == 0 else []
        run(["useradd", "--system", "-M", "-d", str(home), "-s", "/bin/sh", "-c", GECOS, *groups, USER])
        self.created_user = True
        # A locked ("!") password makes sshd refuse even key logins without PAM; "*" does not.
        run(["usermod", "-p", "*", USER])
        shutil.chown(home, USER, USER)

    def ssh_config(self, hosts: dict[str, int]) -> None:
        w = self.work
        blocks = "".join(f"Host {h}\n  Port {p}\n" for h, p in hosts.items())
        self.cfg = w / "ssh_config"
        self.cfg.write_text(blocks + f"""Host *
  HostName 127.0.0.1
  User {USER}
  AddressFamily inet
  BatchMode yes
  IdentitiesOnly yes
  IdentityFile {w}/client_ed25519
  IdentityAgent none
  PubkeyAuthentication yes
  PasswordAuthentication no
  KbdInteractiveAuthentication no
  GSSAPIAuthentication no
  UserKnownHostsFile /dev/null
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking no
  CheckHostIP no
  UpdateHostKeys no
  HostKeyAlgorithms ssh-ed25519
  Ciphers {CIPHER}
  KexAlgorithms {KEX}
  Compression no
  RequestTTY no
  ControlMaster no
  ControlPath none
  ForwardAgent no
  ForwardX11 no
  ServerAliveInterval 0
  ConnectTimeout 30
  ConnectionAttempts 1
  LogLevel ERROR
""")

    def ssh(self, host: str, *remote: str) -> list[str]:
        return ["ssh", "-F", str(self.cfg), host, *remote]

    def docker_run(self, *args: str) -> list[str]:
        return ["docker", "run", "--rm", "--label", BENCH_LABEL, *args]

    def start_servers(self) -> None:
        self.conn = Ours(self, "conn", "connection")
        self.servers.append(self.conn)
        self.conn_rss_fresh = self.conn.rss_kib()
        self.sess = Ours(self, "sess", "session")
        self.servers.append(self.sess)
        self.sshd = Sshd(self)
        self.servers.append(self.sshd)
        # Recorded sessions (audit, stdout and stderr intercepted) for the throughput phase:
        # the binary format and asciinema, each with its metrics endpoint for the bytes a
        # recording had to drop.
        self.recorded = {}
        if "throughput" in PHASES and AUDIT_TP:
            for fmt_name in ("binary", "asciinema"):
                d = self.work / f"audit-{fmt_name}"
                d.mkdir()
                mport = free_port()
                extra = (f"audit:\n  enable: true\n  format: {fmt_name}\n  storage: file\n"
                         f"  file:\n    directory: \"{d}\"\n"
                         f"  intercept:\n    stdout: true\n    stderr: true\n"
                         f"metrics:\n  enable: true\n  listen: 127.0.0.1:{mport}\n")
                srv = Ours(self, f"rec{fmt_name}", "connection", extra=extra)
                self.servers.append(srv)
                self.recorded[f"ours-rec-{fmt_name}"] = (srv, d, mport)
        # A connection-mode server with a warm pool (its containers carry their own label, so
        # the waits for the other variants' containers do not count its members).
        self.pooled = None
        if "latency" in PHASES and POOL_SIZE > 0:
            self.pooled = Ours(self, "pool", "connection", pool=POOL_SIZE)
            self.servers.append(self.pooled)
        self.hosts = {
            **({"ours-pool": self.pooled.port} if self.pooled else {}),
            **{k: v[0].port for k, v in self.recorded.items()},
            "ours-conn": self.conn.port,
            "ours-sess": self.sess.port,
            "sshd-plain": self.sshd.plain,
            "sshd-fc": self.sshd.fc,
            "sshd-fcn": self.sshd.fcn,
        }
        self.ssh_config(self.hosts)
        say(f"servers: ours connection mode :{self.conn.port} (pid {self.conn.pid}), "
            f"ours session mode :{self.sess.port}, sshd :{self.sshd.plain} plain / :{self.sshd.fc} "
            f"ForceCommand / :{self.sshd.fcn} ForceCommand --log-driver none")
        say(f"ForceCommand: {self.sshd.forcecommand}")
        # Every path must work before anything is timed.
        for h in ("ours-conn", "ours-sess", "sshd-plain", "sshd-fc"):
            r = run(self.ssh(h, "echo", "ok"), timeout=T_LOGIN, check=False)
            if r.returncode != 0 or r.stdout.strip() != "ok":
                raise RuntimeError(f"smoke login to {h} failed ({r.returncode}): {r.stdout!r} {r.stderr!r}")
        wait_no_containers(BENCH_LABEL)

    # -- 1. latency ----------------------------------------------------------------
    def timed(self, cmd, timeout=T_LOGIN) -> tuple[float | None, str]:
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, "timeout"
        dt_ = time.perf_counter() - t0
        if r.returncode != 0:
            return None, f"exit {r.returncode}: {r.stderr.decode(errors='replace').strip()[:200]}"
        return dt_, ""

    def wait_pool_full(self, timeout: float) -> bool:
        """Bounded poll until the pooled server has POOL_SIZE running members and no used one."""
        deadline = time.monotonic() + timeout
        label = f"containerssh_instance={self.pooled.instance}"
        while time.monotonic() < deadline:
            running = run(["docker", "ps", "-q", "--filter", f"label={label}",
                           "--filter", "label=containerssh_pool=1"], timeout=60, check=False).stdout.split()
            every = run(["docker", "ps", "-aq", "--filter", f"label={label}"], timeout=60, check=False).stdout.split()
            if len(running) == POOL_SIZE and len(every) == POOL_SIZE:
                return True
            time.sleep(0.1)
        return False

    def latency(self) -> None:
        say(f"\n== 1. login-to-exit latency: `ssh HOST true`, {N_LAT} interleaved rounds ==")
        variants = [
            ("ours-conn", "ours, connection mode", self.ssh("ours-conn", "true")),
            ("ours-sess", "ours, session mode", self.ssh("ours-sess", "true")),
            *([("ours-pool", f"ours, connection mode, pool of {POOL_SIZE}", self.ssh("ours-pool", "true"))]
              if self.pooled else []),
            ("sshd-plain", "OpenSSH sshd, plain login", self.ssh("sshd-plain", "true")),
            ("sshd-fc", "OpenSSH sshd + ForceCommand docker run", self.ssh("sshd-fc", "true")),
            ("floor", "docker run --rm IMAGE true (floor)", self.docker_run(IMAGE, "true")),
        ]
        for _, _, cmd in variants:  # warm-up, untimed
            for _ in range(2):
                self.timed(cmd)
                wait_no_containers(BENCH_LABEL)
        times = {k: [] for k, _, _ in variants}
        fails = {k: [] for k, _, _ in variants}
        for i in range(N_LAT):
            for key, _, cmd in variants:
                t, err = self.timed(cmd)
                if t is None:
                    fails[key].append(err)
                else:
                    times[key].append(t * 1000)
                # Untimed: let deferred removals finish so no variant pays for another's (and
                # the pool refill, so that every pooled login finds a member).
                if not wait_no_containers(BENCH_LABEL, 60):
                    fails[key].append("containers still present 60 s after the login")
                if self.pooled and not self.wait_pool_full(60):
                    fails[key].append("the pool did not refill within 60 s")
            progress(f"latency round {i + 1}/{N_LAT}: " + "  ".join(
                f"{k} {fmt(times[k][-1] if times[k] else None, 0)}ms" for k, _, _ in variants))
        say(f"{'variant':45} {'n':>3} {'median ms':>10} {'p90 ms':>8} {'fail':>5}")
        for key, desc, _ in variants:
            say(f"{desc:45} {len(times[key]):>3} {fmt(median(times[key])):>10} "
                f"{fmt(pct(times[key], .9)):>8} {len(fails[key]):>5}")
            for e in sorted(set(fails[key]))[:3]:
                say(f"    failure: {e}")
        m = {k: median(v) for k, v in times.items()}
        self.results["latency"] = m
        say(f"ratio ours(conn)/ForceCommand = {ratio(m['ours-conn'], m['sshd-fc'])}   "
            f"ours(session)/ForceCommand = {ratio(m['ours-sess'], m['sshd-fc'])}   (target <= 0.75x)")
        for key in ("ours-conn", "ours-sess"):
            over = m[key] - m["floor"]
            say(f"{key}: above the docker-run floor by {fmt(over)} ms vs plain sshd login "
                f"{fmt(m['sshd-plain'])} ms -> {ratio(over, m['sshd-plain'])} (target <= 1.00x)")
        for key, desc, _ in variants:
            self.add("latency", f"{desc} median / p90 (ms)",
                     f"{fmt(m[key])} / {fmt(pct(times[key], .9))}  (n={len(times[key])}, fail={len(fails[key])})")
        self.add("latency", "ours conn / ForceCommand (target <=0.75x)", ratio(m["ours-conn"], m["sshd-fc"]))
        self.add("latency", "ours sess / ForceCommand (target <=0.75x)", ratio(m["ours-sess"], m["sshd-fc"]))
        if "ours-pool" in m:
            self.add("latency", "ours pooled / plain sshd (target <=0.5x)", ratio(m["ours-pool"], m["sshd-plain"]))
            self.add("latency", "ours pooled / ours cold (connection mode)", ratio(m["ours-pool"], m["ours-conn"]))
        for key in ("ours-conn", "ours-sess"):
            self.add("latency", f"({key} - floor) / plain sshd (target <=1x)",
                     f"{ratio(m[key] - m['floor'], m['sshd-plain'])}  ({fmt(m[key] - m['floor'])} ms vs "
                     f"{fmt(m['sshd-plain'])} ms)")
        self.second_session()

    def second_session(self) -> None:
        """`ssh -S CONTROL host true` on a connection that is already open (its container
        running): what a further session costs, ours against plain sshd's, interleaved."""
        say(f"\n== 1a. a further session on an open connection: `ssh -S CTL HOST true`, {N_LAT} rounds ==")
        masters = {}
        for key in ("ours-conn", "sshd-plain"):
            ctl = self.work / f"ctl-{key}"
            proc = subprocess.Popen(["ssh", "-F", str(self.cfg), "-M", "-N", "-o", "ControlPersist=no",
                                     "-S", str(ctl), key], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + T_LOGIN
            while not ctl.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            masters[key] = (proc, ctl)
        cmds = {k: ["ssh", "-F", str(self.cfg), "-S", str(c), k, "true"] for k, (_, c) in masters.items()}
        for cmd in cmds.values():  # the container starts with the first session: untimed
            self.timed(cmd)
        times = {k: [] for k in cmds}
        fails = {k: 0 for k in cmds}
        for _ in range(N_LAT):
            for key, cmd in cmds.items():
                t, _err = self.timed(cmd)
                if t is None:
                    fails[key] += 1
                else:
                    times[key].append(t * 1000)
        for proc, _ in masters.values():
            proc.terminate()
            proc.wait(timeout=30)
        wait_no_containers(BENCH_LABEL, 60)
        for key in cmds:
            say(f"{key:12} median {fmt(median(times[key]))} ms  p90 {fmt(pct(times[key], .9))} ms  "
                f"(n={len(times[key])}, fail={fails[key]})")
            self.add("latency", f"further session on an open connection, {key} median / p90 (ms)",
                     f"{fmt(median(times[key]))} / {fmt(pct(times[key], .9))}  (n={len(times[key])}, fail={fails[key]})")
        self.add("latency", "further session, ours above plain sshd's (ms; target: ours <=10 ms to the program)",
                 fmt(median(times["ours-conn"]) - median(times["sshd-plain"])))

    # -- 1b. where our latency goes ----------------------------------------------------
    def breakdown(self) -> None:
        say(f"\n== 1b. latency breakdown: debug-level server + docker events, {N_BREAK} rounds ==")
        dbg = Ours(self, "dbg", "connection", level="debug")
        self.servers.append(dbg)
        self.ssh_config({**self.hosts, "ours-dbg": dbg.port})
        events_path = self.work / "docker-events.txt"
        evf = open(events_path, "w")
        since = time.time() - 1
        events = subprocess.Popen(
            ["docker", "events", "--since", f"{since:.3f}", "--filter", f"label={BENCH_LABEL}",
             "--format", "{{.TimeNano}}|{{.Action}}|{{.Actor.ID}}"],
            stdin=subprocess.DEVNULL, stdout=evf, stderr=subprocess.DEVNULL)
        self.track(events)
        variants = [("ours-dbg", self.ssh("ours-dbg", "true")),
                    ("sshd-fc", self.ssh("sshd-fc", "true")),
                    ("floor", self.docker_run(IMAGE, "true"))]
        runs = []  # (variant, t0_ns, t1_ns, ok)
        try:
            for _, cmd in variants:
                self.timed(cmd)
                wait_no_containers(BENCH_LABEL)
            for _ in range(N_BREAK):
                for key, cmd in variants:
                    t0 = time.time_ns()
                    t, _err = self.timed(cmd)
                    t1 = time.time_ns()
                    runs.append((key, t0, t1, t is not None))
                    wait_no_containers(BENCH_LABEL, 60)
            time.sleep(1.0)  # let the events stream flush
        finally:
            events.terminate()
            try:
                events.wait(timeout=10)
            except subprocess.TimeoutExpired:
                events.kill()
            evf.close()
            dbg.stop()
        # Parse docker events: container id -> [(ns, action)]
        ev = []
        for line in events_path.read_text().splitlines():
            parts = line.split("|", 2)
            if len(parts) == 3 and parts[0].isdigit():
                ev.append((int(parts[0]), parts[1].split(":")[0].strip(), parts[2]))
        # Parse the server log: (ns, level, message, fields)
        log = []
        for line in dbg.log.read_text(errors="replace").splitlines():
            m = re.match(r"(\S+)\s+(TRACE|DEBUG|INFO|WARN|ERROR)\s+(.*)$", line)
            if not m:
                continue
            ts = parse_ts(m.group(1))
            if ts is None:
                continue
            log.append((ts, m.group(2), m.group(3)))
        say(f"server debug log: {len(log)} lines for {len(runs) // len(variants) + 1} logins; "
            f"docker events: {len(ev)}")

        def first_log(after, needle, cid=None, before=None):
            for ts, _lvl, msg in log:
                if ts >= after and (before is None or ts <= before) and needle in msg and (cid is None or f"connection_id={cid}" in msg):
                    return ts, msg
            return None, None

        def first_ev(cid_prefix, action, after):
            for ts, act, cid in ev:
                if act == action and cid.startswith(cid_prefix) and ts >= after:
                    return ts
            return None

        def container_created_between(t0, t1):
            for ts, act, cid in ev:
                if act == "create" and t0 <= ts <= t1:
                    return cid
            return None

        segs: dict[str, dict[str, list[float]]] = {k: {} for k, _ in variants}

        def put(variant, name, a, b):
            if a is not None and b is not None:
                segs[variant].setdefault(name, []).append((b - a) / 1e6)

        for key, t0, t1, ok in runs:
            if not ok:
                continue
            cid = container_created_between(t0, t1)
            if key == "ours-dbg":
                t_conn, msg = first_log(t0, "connected", before=t1)
                conn_id = None
                if msg:
                    mm = re.search(r"connection_id=(\S+)", msg)
                    conn_id = mm.group(1) if mm else None
                t_auth, _ = first_log(t0, "authenticated", conn_id, t1)
                t_started, _ = first_log(t0, "container started", conn_id, t1)
                t_ended, _ = first_log(t0, "program ended", conn_id, t1 + 5_000_000_000)
                t_clean, _ = first_log(t0, "connection cleaned up", conn_id, t1 + 60_000_000_000)
                c = cid or ""
                e_create = first_ev(c, "create", t0) if cid else None
                e_start = first_ev(c, "start", t0) if cid else None
                e_xc = first_ev(c, "exec_create", t0) if cid else None
                e_xs = first_ev(c, "exec_start", t0) if cid else None
                e_xd = first_ev(c, "exec_die", t0) if cid else None
                e_destroy = first_ev(c, "destroy", t0) if cid else None
                put(key, "a. client start -> TCP accepted (log 'connected')", t0, t_conn)
                put(key, "b. accepted -> authenticated (version, KEX, userauth)", t_conn, t_auth)
                put(key, "c. authenticated -> container created (event)", t_auth, e_create)
                put(key, "d. created -> started (event)", e_create, e_start)
                put(key, "e. started (event) -> 'container started' (API returned)", e_start, t_started)
                put(key, "f. 'container started' -> exec_create (event)", t_started, e_xc)
                put(key, "g. exec_create -> exec_start (event)", e_xc, e_xs)
                put(key, "h. exec_start -> exec_die (`true` runs)", e_xs, e_xd)
                put(key, "i. exec_die -> 'program ended' (exit code fetched)", e_xd, t_ended)
                put(key, "j. 'program ended' -> client exited", t_ended, t1)
                put(key, "k. (off the client's path) client exited -> container destroyed", t1, e_destroy)
                put(key, "l. (off the client's path) client exited -> 'connection cleaned up'", t1, t_clean)
            else:
                c = cid or ""
                e_create = first_ev(c, "create", t0) if cid else None
                e_start = first_ev(c, "start", t0) if cid else None
                e_die = first_ev(c, "die", t0) if cid else None
                e_destroy = first_ev(c, "destroy", t0) if cid else None
                what = "ssh login + sh + docker CLI" if key == "sshd-fc" else "docker CLI"
                put(key, f"a. client start -> container created ({what})", t0, e_create)
                put(key, "b. created -> started", e_create, e_start)
                put(key, "c. started -> died (attach + `true`)", e_start, e_die)
                put(key, "d. died -> destroyed (--rm)", e_die, e_destroy)
                put(key, "e. destroyed -> client exited", e_destroy, t1)
            put(key, "TOTAL client start -> client exited", t0, t1)
        for key, _ in variants:
            say(f"-- {key} (medians, ms)")
            for name in segs[key]:
                xs = segs[key][name]
                say(f"   {name:64} {fmt(median(xs)):>8}  (n={len(xs)})")
        self.results["breakdown"] = {k: {n: median(v) for n, v in s.items()} for k, s in segs.items()}
        o = self.results["breakdown"].get("ours-dbg", {})
        if o:
            pre = sum(v for n, v in o.items() if n[:2] in ("a.", "b."))
            cont = sum(v for n, v in o.items() if n[:2] in ("c.", "d.", "e."))
            exe = sum(v for n, v in o.items() if n[:2] in ("f.", "g.", "h.", "i."))
            tail = o.get("j. 'program ended' -> client exited", float("nan"))
            self.add("breakdown", "ours: connect+KEX+auth / container create+start / exec / teardown (ms)",
                     f"{fmt(pre)} / {fmt(cont)} / {fmt(exe)} / {fmt(tail)}")

    # -- 2. throughput -------------------------------------------------------------
    def throughput(self) -> None:
        for gen in TP_GENS:
            self.throughput_one(gen)

    def throughput_one(self, gen_name: str) -> None:
        mib = TP_BYTES / (1 << 20)
        say(f"\n== 2. throughput: {mib:.0f} MiB of zeros to stdout, written by {gen_name}, "
            f"{N_TP} interleaved rounds ==")
        if gen_name == "dd":
            if TP_BYTES % (1 << 20):
                raise RuntimeError("BENCH_TP_GEN=dd needs BENCH_TP_BYTES to be a multiple of 1 MiB")
            gen = ["dd", "if=/dev/zero", "bs=1048576", f"count={TP_BYTES >> 20}"]
        elif gen_name == "head":
            gen = ["head", "-c", str(TP_BYTES), "/dev/zero"]
        else:
            raise RuntimeError(f"BENCH_TP_GEN: unknown generator {gen_name!r} (head, dd)")
        remote = shlex.join(gen)
        say(f"generator inside the container: {remote}")
        variants = [
            ("ours-conn", "ours, connection mode", self.ssh("ours-conn", remote)),
            ("sshd-fc", "sshd + ForceCommand docker run (json-file)", self.ssh("sshd-fc", remote)),
            ("sshd-fcn", "sshd + ForceCommand ... --log-driver none", self.ssh("sshd-fcn", remote)),
            ("direct", "docker run -i --log-driver none (direct)",
             self.docker_run("-i", "--log-driver", "none", IMAGE, *gen)),
        ] + [(k, f"ours, recorded ({k.rsplit('-', 1)[1]})", self.ssh(k, remote)) for k in self.recorded]
        rates = {k: [] for k, _, _ in variants}
        fails = {k: [] for k, _, _ in variants}
        secs = {k: [] for k, _, _ in variants}
        for i in range(N_TP):
            for key, _, cmd in variants:
                sh = f"set -o pipefail; {shlex.join(cmd)} </dev/null | wc -c"
                t0 = time.perf_counter()
                try:
                    r = subprocess.run(["bash", "-c", sh], stdin=subprocess.DEVNULL, capture_output=True,
                                       text=True, timeout=T_THROUGHPUT)
                    t = time.perf_counter() - t0
                    n = int(r.stdout.strip() or 0)
                    if r.returncode != 0 or n != TP_BYTES:
                        fails[key].append(f"exit {r.returncode}, {n} bytes: {r.stderr.strip()[:200]}")
                    else:
                        secs[key].append(t)
                        rates[key].append(mib / t)
                except subprocess.TimeoutExpired:
                    fails[key].append("timeout")
                wait_no_containers(BENCH_LABEL, 60)
            progress(f"throughput ({gen_name}) round {i + 1}/{N_TP}: " + "  ".join(
                f"{k} {fmt(rates[k][-1] if rates[k] else None, 0)}MiB/s" for k, _, _ in variants))
        lat = self.results.get("latency", {})
        setup_of = {"ours-conn": lat.get("ours-conn"), "sshd-fc": lat.get("sshd-fc"),
                    "sshd-fcn": lat.get("sshd-fc"), "direct": lat.get("floor")}
        say(f"{'variant':45} {'n':>3} {'median MiB/s':>12} {'median s':>9} {'streaming MiB/s*':>17} {'fail':>5}")
        med = {}
        stream = {}
        for key, desc, _ in variants:
            med[key] = median(rates[key])
            s = median(secs[key])
            st = setup_of.get(key)
            stream[key] = mib / (s - st / 1000) if st and s == s and s > st / 1000 else float("nan")
            say(f"{desc:45} {len(rates[key]):>3} {fmt(med[key], 0):>12} {fmt(s, 2):>9} "
                f"{fmt(stream[key], 0):>17} {len(fails[key]):>5}")
            for e in sorted(set(fails[key]))[:3]:
                say(f"    failure: {e}")
        say("  * streaming = bytes / (time - that path's median `true` latency from section 1), an estimate")
        say(f"ours/ForceCommand(json-file) = {ratio(med['ours-conn'], med['sshd-fc'])} (target >= 1.8x)   "
            f"ours/ForceCommand(log none) = {ratio(med['ours-conn'], med['sshd-fcn'])}   "
            f"ours/docker direct = {ratio(med['ours-conn'], med['direct'])} (target >= 0.9x)")
        self.results[f"throughput-{gen_name}"] = med
        for key, desc, _ in variants:
            self.add("throughput", f"[{gen_name}] {desc} (MiB/s)",
                     f"{fmt(med[key], 0)}  (streaming est. {fmt(stream[key], 0)}; n={len(rates[key])}, fail={len(fails[key])})")
        self.add("throughput", f"[{gen_name}] ours / ForceCommand json-file (target >=1.8x)",
                 ratio(med["ours-conn"], med["sshd-fc"]))
        self.add("throughput", f"[{gen_name}] ours / ForceCommand log none", ratio(med["ours-conn"], med["sshd-fcn"]))
        self.add("throughput", f"[{gen_name}] ours / docker direct (target >=0.9x)", ratio(med["ours-conn"], med["direct"]))
        for key, (srv, d, mport) in self.recorded.items():
            dropped = scrape(mport, "containerssh_audit_dropped_bytes_total")
            written = sum(f.stat().st_size for f in d.iterdir())
            total = TP_BYTES * N_TP
            kept = 1 - dropped / total if dropped == dropped else float("nan")
            say(f"{key}: recorded / unrecorded = {ratio(med[key], med['ours-conn'])}; kept "
                f"{fmt(100 * kept, 1)}% of the output (dropped {dropped:.0f} bytes under flood), files "
                f"{written / (1 << 20):.1f} MiB")
            self.add("throughput", f"[{gen_name}] {key} / ours unrecorded (MiB/s ratio)", ratio(med[key], med["ours-conn"]))
            self.add("throughput", f"[{gen_name}] {key}: output kept in the recording", f"{fmt(100 * kept, 1)}%")
            for f in d.iterdir():
                f.unlink()

    # -- 3. memory -----------------------------------------------------------------
    def hold_sessions(self, host: str, k: int, timeout: float = 180) -> tuple[list[subprocess.Popen], int]:
        """Opens k `ssh -T host` shells (stdin kept open), each proven live by an echo."""
        procs = []
        for _ in range(k):
            p = subprocess.Popen(["ssh", "-F", str(self.cfg), "-T", host], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
            self.track(p)
            procs.append(p)
            p.stdin.write(b"echo ready\n")
            p.stdin.flush()
        buf = {p.stdout.fileno(): b"" for p in procs}
        pending = set(buf)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            r, _, _ = select.select(list(pending), [], [], max(0.0, min(1.0, deadline - time.monotonic())))
            for fd in r:
                chunk = os.read(fd, 4096)
                buf[fd] += chunk
                if b"ready" in buf[fd] or not chunk:
                    pending.discard(fd)
        ready = sum(1 for v in buf.values() if b"ready" in v)
        return procs, ready

    def release_sessions(self, procs: list[subprocess.Popen]) -> int:
        for p in procs:
            try:
                p.stdin.close()  # EOF: the shell exits, the session ends
            except OSError:
                pass
        deadline = time.monotonic() + 60
        bad = 0
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
                bad += 1
            for s in (p.stdout, p.stderr):
                s.close()
        return bad

    def memory(self) -> None:
        say(f"\n== 3. memory: a fresh connection-mode server, {K_SESS} idle sessions (`ssh -T` shells) ==")
        mem = Ours(self, "mem", "connection")
        self.servers.append(mem)
        self.ssh_config({**self.hosts, "ours-mem": mem.port})
        time.sleep(0.5)
        rss_fresh = mem.rss_kib()
        r = self.timed(self.ssh("ours-mem", "true"))
        wait_no_containers(mem.label())
        time.sleep(0.5)
        rss0 = mem.rss_kib()
        t0 = time.perf_counter()
        procs, ready = self.hold_sessions("ours-mem", K_SESS)
        t_ready = time.perf_counter() - t0
        time.sleep(1.0)
        rss_k = mem.rss_kib()
        n_cont = len(labelled_containers(mem.label()))
        bad = self.release_sessions(procs)
        gone = wait_no_containers(mem.label(), T_SETTLE)
        time.sleep(0.5)
        rss_after = mem.rss_kib()
        per = (rss_k - rss0) / K_SESS if rss_k is not None and rss0 is not None else float("nan")
        say(f"ours idle RSS right after start: {rss_fresh} KiB ({fmt(rss_fresh / 1024, 2)} MiB; target <= 8 MiB)"
            f"; after one login: {rss0} KiB; first-login warm-up (untimed result {fmt((r[0] or 0) * 1000, 0)} ms)")
        say(f"{ready}/{K_SESS} sessions live in {fmt(t_ready, 1)} s; {n_cont} containers; RSS with them: {rss_k} KiB")
        say(f"per idle session: ({rss_k} - {rss0}) / {K_SESS} = {fmt(per, 1)} KiB (target <= 64 KiB)")
        say(f"after closing: {bad} clients had to be killed; containers gone: {gone}; RSS {rss_after} KiB")
        mem.stop()
        self.add("memory", "ours idle RSS after start (target <=8 MiB)", f"{fmt(rss_fresh / 1024, 2)} MiB ({rss_fresh} KiB)")
        self.add("memory", f"ours RSS per idle session, K={K_SESS} (target <=64 KiB)",
                 f"{fmt(per, 1)} KiB  ({rss0} -> {rss_k} KiB, {ready}/{K_SESS} live, {n_cont} containers)")
        self.add("memory", "ours after closing: containers gone / RSS", f"{gone} / {rss_after} KiB")
        # OpenSSH for reference: the per-connection sshd processes (monitor + session child).
        listener_rss = kib(self.sshd.proc.pid, "VmRSS")
        n_before, rss_before, pss_before = self.sshd.children_mem()
        procs, ready = self.hold_sessions("sshd-plain", K_SESS)
        time.sleep(1.0)
        n_k, rss_sum, pss_sum = self.sshd.children_mem()
        self.release_sessions(procs)
        say(f"OpenSSH sshd: listener {listener_rss} KiB; {ready}/{K_SESS} sessions -> {n_k - n_before} sshd "
            f"processes, sum RSS {rss_sum - rss_before} KiB, sum PSS {pss_sum - pss_before} KiB -> "
            f"{fmt((rss_sum - rss_before) / K_SESS, 0)} KiB RSS / {fmt((pss_sum - pss_before) / K_SESS, 0)} KiB PSS per session")
        self.add("memory", "sshd per session: RSS sum / PSS sum (reference)",
                 f"{fmt((rss_sum - rss_before) / K_SESS, 0)} / {fmt((pss_sum - pss_before) / K_SESS, 0)} KiB "
                 f"({n_k - n_before} processes for {ready} sessions)")

    # -- 4. parallel logins ----------------------------------------------------------
    def burst(self, host: str, m: int) -> dict:
        res: list = [None] * m
        cmd = self.ssh(host, "true")

        def worker(i: int) -> None:
            t0 = time.perf_counter()
            try:
                r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, timeout=T_PARALLEL)
                res[i] = (r.returncode, time.perf_counter() - t0,
                          r.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""])
            except subprocess.TimeoutExpired:
                res[i] = ("timeout", time.perf_counter() - t0, ["timeout"])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(m)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(T_PARALLEL + 30)
        wall = time.perf_counter() - t0
        ok = [r for r in res if r and r[0] == 0]
        errs: dict[str, int] = {}
        for r in res:
            if not r or r[0] != 0:
                e = (f"exit {r[0]}: {r[2][0][:120]}") if r else "no result"
                errs[e] = errs.get(e, 0) + 1
        lat = [r[1] * 1000 for r in ok]
        return {"ok": len(ok), "fail": m - len(ok), "wall": wall, "p50": median(lat),
                "max": max(lat) if lat else float("nan"), "errs": errs}

    def parallel(self) -> None:
        say(f"\n== 4. parallel logins: {', '.join(map(str, PARALLEL))} concurrent `ssh HOST true` ==")
        say(f"{'target':22} {'M':>4} {'ok':>4} {'fail':>5} {'wall s':>7} {'p50 ms':>8} {'max ms':>8}  notes")
        targets = [("ours-conn", "ours, connection"), ("sshd-plain", "sshd plain")]
        if PARALLEL_FC:
            targets.append(("sshd-fc", "sshd ForceCommand"))
        for m in PARALLEL:
            for host, name in targets:
                r = self.burst(host, m)
                note = ""
                if host == "ours-conn":
                    gone = wait_no_containers(self.conn.label(), T_SETTLE)
                    left = 0 if gone else len(labelled_containers(self.conn.label()))
                    note = f"containers left after {T_SETTLE}s: {left}; server alive: {self.conn.alive()}"
                say(f"{name:22} {m:>4} {r['ok']:>4} {r['fail']:>5} {fmt(r['wall'], 1):>7} "
                    f"{fmt(r['p50'], 0):>8} {fmt(r['max'], 0):>8}  {note}")
                for e, n in sorted(r["errs"].items(), key=lambda x: -x[1])[:4]:
                    say(f"    {n} x {e}")
                self.add("parallel", f"{name}, {m} at once: ok/fail, wall, p50/max",
                         f"{r['ok']}/{r['fail']}, {fmt(r['wall'], 1)} s, {fmt(r['p50'], 0)}/{fmt(r['max'], 0)} ms"
                         + (f"; {note}" if note else ""))
                wait_no_containers(BENCH_LABEL, T_SETTLE)
        if PARALLEL_POOL and PARALLEL:
            self.parallel_pooled()

    def parallel_pooled(self) -> None:
        """The largest burst again, against a server whose pool holds that many members."""
        m = max(PARALLEL)
        srv = Ours(self, "ppool", "connection", pool=m)
        self.servers.append(srv)
        self.hosts["ours-ppool"] = srv.port
        self.ssh_config(self.hosts)
        label = f"label=containerssh_instance={srv.instance}"

        def members() -> int:
            return len(run(["docker", "ps", "-q", "--filter", label, "--filter", "label=containerssh_pool=1"],
                           timeout=60, check=False).stdout.split())
        t0 = time.monotonic()
        while members() < m and time.monotonic() - t0 < 600:
            time.sleep(0.5)
        fill = time.monotonic() - t0
        r = self.burst("ours-ppool", m)
        name = f"ours, connection, pool {m}"
        note = f"pool filled in {fmt(fill, 0)} s ({members()} waiting after the burst)"
        say(f"{name:22} {m:>4} {r['ok']:>4} {r['fail']:>5} {fmt(r['wall'], 1):>7} "
            f"{fmt(r['p50'], 0):>8} {fmt(r['max'], 0):>8}  {note}")
        for e, n in sorted(r["errs"].items(), key=lambda x: -x[1])[:4]:
            say(f"    {n} x {e}")
        self.add("parallel", f"{name}, {m} at once: ok/fail, wall, p50/max",
                 f"{r['ok']}/{r['fail']}, {fmt(r['wall'], 1)} s, {fmt(r['p50'], 0)}/{fmt(r['max'], 0)} ms; {note}")
        srv.stop()
        self.servers.remove(srv)

    # -- 6. Kubernetes through the fake API server ------------------------------------
    def kube(self) -> None:
        say(f"\n== 6. Kubernetes (the project's fake API server, pods as local containers): "
            f"`ssh HOST true`, {N_KUBE} interleaved rounds ==")
        fake = KubeFake(self)
        servers = []
        try:
            cold = Ours(self, "kcold", "connection", kube=fake)
            pooled = Ours(self, "kpool", "connection", pool=2, kube=fake)
            servers = [cold, pooled]
            self.hosts.update({"kube-cold": cold.port, "kube-pool": pooled.port})
            self.ssh_config(self.hosts)
            variants = [("kube-cold", "ours on Kubernetes, connection mode (cold)", cold, 0),
                        ("kube-pool", "ours on Kubernetes, connection mode, pool of 2", pooled, 2)]
            times = {k: [] for k, _, _, _ in variants}
            fails = {k: [] for k, _, _, _ in variants}
            for key, _, srv, pool in variants:  # warm-up, untimed
                if not fake.settled(srv.instance, pool, 120):
                    raise RuntimeError(f"{key}: pods did not settle\n{srv.log.read_text(errors='replace')[-3000:]}")
                self.timed(self.ssh(key, "true"))
            for i in range(N_KUBE):
                for key, _, srv, pool in variants:
                    if not fake.settled(srv.instance, pool, 120):
                        fails[key].append("pods did not settle within 120 s")
                        continue
                    t, err = self.timed(self.ssh(key, "true"))
                    if t is None:
                        fails[key].append(err)
                    else:
                        times[key].append(t * 1000)
                progress(f"kube round {i + 1}/{N_KUBE}: " + "  ".join(
                    f"{k} {fmt(times[k][-1] if times[k] else None, 0)}ms" for k, _, _, _ in variants))
            say(f"{'variant':50} {'n':>3} {'median ms':>10} {'p90 ms':>8} {'fail':>5}")
            for key, desc, _, _ in variants:
                say(f"{desc:50} {len(times[key]):>3} {fmt(median(times[key])):>10} "
                    f"{fmt(pct(times[key], .9)):>8} {len(fails[key]):>5}")
                for e in sorted(set(fails[key]))[:3]:
                    say(f"    failure: {e}")
                self.add("kube", f"{desc} median / p90 (ms)",
                         f"{fmt(median(times[key]))} / {fmt(pct(times[key], .9))}  "
                         f"(n={len(times[key])}, fail={len(fails[key])})")
            r = ratio(median(times["kube-pool"]), median(times["kube-cold"]))
            say(f"ours pooled / ours cold on Kubernetes = {r} (target <= 0.5x)")
            self.add("kube", "pooled / cold (target <=0.5x)", r)
        finally:
            for srv in servers:
                srv.stop()
                if srv in self.servers:
                    self.servers.remove(srv)
            fake.stop()

    # -- 5. binary -----------------------------------------------------------------
    def binary(self) -> None:
        say("\n== 5. binary size ==")
        for name, path in (("release (default target)", BIN), ("static (+crt-static, --target)", STATIC_BIN)):
            if not path or not os.path.exists(path):
                say(f"{name}: not built")
                self.add("binary", name, "not built")
                continue
            size = os.path.getsize(path) / (1 << 20)
            ldd = run(["ldd", path], check=False)
            ldd_text = (ldd.stdout + ldd.stderr).strip()
            static = "not a dynamic executable" in ldd_text or "statically linked" in ldd_text
            ftxt = run(["file", "-b", path], check=False).stdout.strip() if shutil.which("file") else ""
            stripped = "not stripped" not in ftxt if ftxt else None
            say(f"{name}: {path}\n   {fmt(size, 2)} MiB; ldd: {ldd_text.splitlines()[0] if ldd_text else '?'}"
                f"{' ...' if len(ldd_text.splitlines()) > 1 else ''}\n   file: {ftxt}")
            self.add("binary", f"{name} size", f"{fmt(size, 2)} MiB; static: {static}; stripped: {stripped}"
                     + (" (target: static, stripped, <=8 MiB)" if "static" in name else ""))

    # -- summary & cleanup --------------------------------------------------------
    def print_summary(self) -> None:
        say("\n" + "=" * 100)
        say(f"SUMMARY  run {RUN}  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  "
            f"({os.cpu_count()} CPUs; image {IMAGE}; cipher {CIPHER}, kex {KEX})")
        say(f"{'section':11} {'metric':58} value")
        say("-" * 100)
        for sec, metric, value in self.summary:
            say(f"{sec:11} {metric:58} {value}")
        say("=" * 100)

    def cleanup(self) -> None:
        for s in reversed(self.servers):
            try:
                s.stop()
            except Exception as e:  # noqa: BLE001 - best effort
                print(f"cleanup: stopping {s}: {e}", file=sys.stderr)
        for p in self.tracked:
            if p.poll() is None:
                p.kill()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        try:
            ids = labelled_containers(BENCH_LABEL)
            if ids:
                print(f"cleanup: removing {len(ids)} leftover containers", file=sys.stderr)
                run(["docker", "rm", "-f", "-v", *ids], timeout=120, check=False)
        except Exception as e:  # noqa: BLE001
            print(f"cleanup: docker: {e}", file=sys.stderr)
        if self.created_user:
            run(["userdel", USER], check=False)
        if KEEP:
            print(f"kept {self.work} (BENCH_KEEP=1)", file=sys.stderr)
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def main() -> int:
    def on_term(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    say(f"containerssh benchmark, run {RUN}: N={N_LAT} latency rounds, {N_TP} throughput rounds of "
        f"{TP_BYTES} bytes ({'/'.join(TP_GENS)}), {K_SESS} idle sessions, parallel {PARALLEL}, breakdown {N_BREAK}; phases {PHASES}")
    b = Bench()
    rc = 0
    try:
        if "binary" in PHASES:
            b.binary()
        b.setup()
        b.start_servers()
        say(f"ours idle RSS right after start (connection-mode server): {b.conn_rss_fresh} KiB")
        for phase in ("latency", "breakdown", "throughput", "memory", "parallel", "kube"):
            if phase in PHASES:
                t0 = time.monotonic()
                getattr(b, phase)()
                progress(f"{phase} took {time.monotonic() - t0:.0f} s")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        rc = 130
    except Exception as e:  # noqa: BLE001 - report, clean up, fail
        import traceback
        traceback.print_exc()
        print(f"benchmark failed: {e}", file=sys.stderr)
        rc = 1
    finally:
        b.print_summary()
        b.cleanup()
    return rc


if __name__ == "__main__":
    sys.exit(main())
