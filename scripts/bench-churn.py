#!/usr/bin/env python3
"""Held under load (README "Benchmarks"; scripts/bench-churn.sh runs this).

Two replicas (`nixery serve`) on one storage folder serve the busybox set
`pkgs/` while, for DURATION seconds:

  - 1,000 idle HTTP/1.1 keep-alive connections (500 per replica, each after
    one `GET /v2/`) stay open; one closed is opened again at once;
  - 200 clients, each from its own loopback address (127.0.0.2 and on, so
    that each is its own client for the registry's per-client limits), pull
    a mix of 50 images built before the measured phase and 10 new ones
    released one by one during it, with 1 to 3 s between pulls. A pull is
    what containerd does: HEAD of the tag with containerd's Accept header,
    GET of the manifest by the Docker-Content-Digest, GET of the config and
    every layer, each checked against its sha256 (and size). A client whose
    replica cannot be reached (refused, reset, closed before or in the
    middle of an answer) pulls once more from the other one, as a load
    balancer would; such retries are counted apart from failures. A reused
    keep-alive connection that closes before any byte of the answer is
    opened again and the request sent again first, as HTTP clients do;
  - at 20 % and 65 % of the phase, `nixery gc --keep-pulled-within 1h
    --grace 0s` runs as its own process on the storage folder, after six
    cached images each time have had their `cache/pulled/<key>` record set
    to 1970: it drops them (and their blobs) while clients pull them, so
    that clients pull them again and they are built again;
  - at 45 %, replica A is killed with SIGKILL and started again 3 s later
    on the same port.

The replicas' peak RSS (VmHWM) and open files (/proc/<pid>/fd) are sampled
every half second. Afterwards both replicas stop (SIGTERM) and the storage
folder is checked: every image, index, layer and referrers record names
blobs that exist, every manifest's config and layers (an index's manifests)
exist, every blob's bytes hash to its address, and nothing is left under
`staging/` but what the killed replica was writing when it died (which the
README documents: a start deletes it once it is an hour old).

Goal: no failed pull but at most one per image a collection dropped (its
first pull after the drop may fail), and no storage problem. The last line
is machine-readable.

Usage: bench-churn.py NIXERY_BIN PKGS WORK [DURATION]
       bench-churn.py --check STORAGE_PATH   (the storage check alone)
"""

import asyncio
import collections
import hashlib
import json
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time

ACCEPT = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "*/*",
])
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
CLIENTS = int(os.environ.get("BENCH_CLIENTS", 200))
IDLE = int(os.environ.get("BENCH_IDLE", 1000))
THINK = tuple(float(x) for x in os.environ.get("BENCH_THINK", "1,3").split(","))
CACHED, NEW, DROPPED_PER_GC = 50, 10, 6
CONNECT_TIMEOUT, REQUEST_TIMEOUT, DRAIN_TIMEOUT = 10, 120, 150
SEED = 28
LONG_AGO = 1000

# Attributes of pkgs/ (README "The package sets"), as image name components.
PACKAGES = ["hello", "git", "curl", "htop", "python3", "tools.jq", "tools.ripgrep", "7zip", "zlib",
            "pcre2", "openssl", "ncurses", "openblas", "nano", "coreutils", "moreutils", "busybox",
            "bashinteractive", "python3packages.numpy"]


SHELL = {"bashinteractive", "coreutils", "moreutils", "nano"}


def image_names():
    """60 distinct images: pairs of packages, every fifth with `shell` first
    (and then neither of the pair one that `shell` brings already)."""
    pairs = [(a, b) for i, a in enumerate(PACKAGES) for b in PACKAGES[i + 1:]]
    random.Random(SEED).shuffle(pairs)
    names = []
    for a, b in pairs:
        shell = len(names) % 5 == 0 and not {a, b} & SHELL
        names.append(("shell/" if shell else "") + f"{a}/{b}")
    return names[:CACHED + NEW]


def now():
    return time.monotonic()


class Down(Exception):
    """The replica could not be reached, or dropped the connection."""

    def __init__(self, step, why):
        super().__init__(f"{step}: {why}")
        self.step, self.why = step, why


class Failed(Exception):
    """The replica answered, wrongly."""

    def __init__(self, step, why):
        super().__init__(f"{step}: {why}")
        self.step, self.why = step, why


class Abort(Exception):
    """The benchmark cannot go on (a replica did not start, a build before the phase failed)."""


class _Stale(Exception):
    """The connection closed before any byte of the answer."""


class Connection:
    """One HTTP/1.1 keep-alive connection from a source address to a replica."""

    def __init__(self, port, source):
        self.port, self.source = port, source
        self.reader = self.writer = None
        self.used = False

    async def open(self, step):
        try:
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.port, local_addr=(self.source, 0), limit=1 << 20),
                CONNECT_TIMEOUT)
        except asyncio.TimeoutError:
            raise Down(step, "connect timeout") from None
        except OSError as error:
            raise Down(step, type(error).__name__) from None
        self.used = False

    def close(self):
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:
                pass
        self.reader = self.writer = None

    async def request(self, method, path, step, accept=None, keep=True):
        """(status, headers, body if keep or the answer is not 200, sha256 hex, length)."""
        for attempt in (0, 1):
            if self.writer is None:
                await self.open(step)
            reused = self.used
            try:
                return await asyncio.wait_for(self._exchange(method, path, accept, keep), REQUEST_TIMEOUT)
            except asyncio.TimeoutError:
                self.close()
                raise Failed(step, "timeout") from None
            except _Stale:
                self.close()
                if reused and attempt == 0:
                    continue
                raise Down(step, "closed before answering") from None
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                self.close()
                raise Down(step, "closed mid-answer") from None

    async def _exchange(self, method, path, accept, keep):
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUser-Agent: bench-churn\r\n"
        if accept:
            head += f"Accept: {accept}\r\n"
        try:
            self.writer.write((head + "\r\n").encode())
            await self.writer.drain()
            line = await self.reader.readline()
        except (ConnectionError, OSError):
            raise _Stale() from None
        if not line:
            raise _Stale()
        self.used = True
        status = int(line.split()[1])
        headers = {}
        while True:
            line = await self.reader.readline()
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            if line in (b"\r\n", b"\n"):
                break
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        hasher, parts, length = hashlib.sha256(), [], 0
        keep = keep or status != 200

        def take(chunk):
            nonlocal length
            hasher.update(chunk)
            length += len(chunk)
            if keep:
                parts.append(chunk)

        if method == "HEAD" or status in (204, 304) or status < 200:
            pass
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    while (await self.reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                take(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
        elif "content-length" in headers:
            left = int(headers["content-length"])
            while left:
                chunk = await self.reader.read(min(left, 1 << 20))
                if not chunk:
                    raise asyncio.IncompleteReadError(b"", left)
                take(chunk)
                left -= len(chunk)
        else:
            while chunk := await self.reader.read(1 << 20):
                take(chunk)
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, b"".join(parts), hasher.hexdigest(), length


def refusal(step, status, body):
    """Why an answer is wrong: its status and the registry's error code."""
    why = str(status)
    try:
        why += " " + json.loads(body)["errors"][0]["code"]
    except Exception:
        pass
    return Failed(step, why)


async def manifest(conn, base, digest, step):
    status, _, body, got, _ = await conn.request("GET", f"{base}/manifests/{digest}", step, ACCEPT)
    if status != 200:
        raise refusal(step, status, body)
    if "sha256:" + got != digest:
        raise Failed(step, "sha256 differs from the digest")
    return json.loads(body)


async def pull(conn, name):
    """One pull as containerd makes it; (manifest digest, bytes)."""
    base = f"/v2/{name}"
    status, headers, body, _, _ = await conn.request("HEAD", f"{base}/manifests/latest", "head", ACCEPT)
    if status != 200:
        raise refusal("head", status, body)
    digest = headers.get("docker-content-digest")
    if not digest:
        raise Failed("head", "no Docker-Content-Digest")
    document = await manifest(conn, base, digest, "manifest")
    if document.get("mediaType") in INDEX_TYPES or "manifests" in document:
        chosen = [m for m in document["manifests"] if m.get("platform", {}).get("architecture") == "amd64"]
        if not chosen:
            raise Failed("manifest", "no amd64 manifest in the index")
        document = await manifest(conn, base, chosen[0]["digest"], "platform manifest")
    total = 0
    for step, blob in [("config", document["config"])] + [("layer", layer) for layer in document["layers"]]:
        status, _, body, got, length = await conn.request("GET", f"{base}/blobs/{blob['digest']}", step, keep=False)
        if status != 200:
            raise refusal(step, status, body)
        if "sha256:" + got != blob["digest"]:
            raise Failed(step, "sha256 differs from the digest")
        if length != blob["size"]:
            raise Failed(step, "size differs from the manifest's")
        total += length
    return digest, total


class Replica:
    def __init__(self, name, binary, env, port, work):
        self.name, self.binary, self.env, self.port, self.work = name, binary, env, port, work
        self.proc = None
        self.lives = []  # per start: {"pid", "hwm_kib", "fds", "rss_kib"}
        self.up = False

    def start(self):
        log = open(os.path.join(self.work, f"{self.name}-{len(self.lives) + 1}.log"), "w")
        env = dict(os.environ, **self.env, PORT=str(self.port))
        self.proc = subprocess.Popen([self.binary, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
        self.log = log.name
        self.lives.append({"pid": self.proc.pid, "hwm_kib": 0, "fds": 0, "cpu_s": 0.0})

    async def ready(self, timeout=60):
        deadline = now() + timeout
        while "nixery is serving on" not in open(self.log).read():
            if self.proc.poll() is not None or now() > deadline:
                raise Abort(f"replica {self.name} did not start:\n{open(self.log).read()}")
            await asyncio.sleep(0.05)
        self.up = True

    def sample(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        life = self.lives[-1]
        try:
            for line in open(f"/proc/{self.proc.pid}/status"):
                if line.startswith("VmHWM:"):
                    life["hwm_kib"] = max(life["hwm_kib"], int(line.split()[1]))
            life["fds"] = max(life["fds"], len(os.listdir(f"/proc/{self.proc.pid}/fd")))
            fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
            life["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (FileNotFoundError, ProcessLookupError):
            pass


def check_storage(root, killed_wall=None):
    """Problems in a storage folder, by kind (with an example of each); records
    without an image record; staging files last written before `killed_wall`
    (the time a replica was killed), which are not problems; the blob count."""
    problems = collections.Counter()
    examples = {}

    def problem(kind, what):
        problems[kind] += 1
        examples.setdefault(kind, what)

    def read_json(path):
        try:
            return json.load(open(path))
        except FileNotFoundError:
            return None
        except ValueError:
            problem("record or document that is not JSON", path)
            return None

    blob_dir = os.path.join(root, "blobs/sha256")
    present = set(os.listdir(blob_dir))
    for hex_digest in present:
        h = hashlib.sha256()
        with open(os.path.join(blob_dir, hex_digest), "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != hex_digest:
            problem("blob whose bytes do not hash to its address", hex_digest)

    def hexof(digest):
        return digest.split(":", 1)[1]

    def document(digest, who):
        hex_digest = hexof(digest)
        if hex_digest not in present:
            problem("record naming a missing manifest or index", f"{who} -> {digest}")
            return None
        return read_json(os.path.join(blob_dir, hex_digest))

    def manifest_blobs(digest, who):
        doc = document(digest, who)
        if doc is None:
            return
        if "manifests" in doc:
            for m in doc["manifests"]:
                manifest_blobs(m["digest"], f"{who} (index {digest})")
            return
        for blob in [doc["config"]] + doc.get("layers", []):
            if hexof(blob["digest"]) not in present:
                problem("manifest naming a missing config or layer", f"{digest} ({who}) -> {blob['digest']}")
        referrers = read_json(os.path.join(root, "cache/referrers", hexof(digest))) or []
        for referrer in referrers:
            manifest_blobs(referrer["digest"], f"referrer of {digest}")

    def records(kind):
        folder = os.path.join(root, "cache", kind)
        return sorted(os.listdir(folder)) if os.path.isdir(folder) else []

    for key in records("images"):
        record = read_json(os.path.join(root, "cache/images", key))
        for _, m in (record or {}).get("manifests", []):
            manifest_blobs(m["digest"], f"cache/images/{key}")
    for key in records("indexes"):
        record = read_json(os.path.join(root, "cache/indexes", key))
        if record:
            manifest_blobs(record["digest"], f"cache/indexes/{key}")
    for key in records("layers"):
        record = read_json(os.path.join(root, "cache/layers", key))
        if record and hexof(record["digest"]) not in present:
            problem("layer record naming a missing blob", f"cache/layers/{key}")
    for key in records("referrers"):
        for referrer in read_json(os.path.join(root, "cache/referrers", key)) or []:
            if hexof(referrer["digest"]) not in present:
                problem("referrers record naming a missing artifact", f"cache/referrers/{key}")
    images = set(records("images"))
    orphans = collections.Counter()
    for kind in ("pulled", "plans"):
        orphans[kind] = [key for key in records(kind) if key not in images]
    left_by_kill = 0
    staging = os.path.join(root, "staging")
    for folder, _, files in os.walk(staging):
        for file in files:
            path = os.path.join(folder, file)
            if killed_wall and os.stat(path).st_mtime <= killed_wall + 0.5:
                left_by_kill += 1
            else:
                problem("leftover under staging/ (no upload runs now)", path)
    return problems, examples, orphans, left_by_kill, len(present)


class Bench:
    def __init__(self, binary, pkgs, work, duration):
        self.binary, self.work, self.duration = binary, work, duration
        self.storage = os.path.join(work, "storage")
        self.env = {
            "RUST_LOG": "warn", "NO_COLOR": "1", "NIXERY_LISTEN_ADDRESS": "127.0.0.1",
            "NIXERY_PKGS_PATH": pkgs, "STORAGE_PATH": self.storage, "NIXERY_STORAGE_BACKEND": "filesystem",
            # The idle connections stay open for the whole run.
            "NIXERY_IDLE_TIMEOUT": str(int(duration) + DRAIN_TIMEOUT + 120),
        }
        ports = []
        for _ in range(2):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            ports.append(s)
        self.replicas = [Replica(n, binary, self.env, s.getsockname()[1], work) for n, s in zip("AB", ports)]
        for s in ports:
            s.close()
        self.names = image_names()
        self.cached, self.new = self.names[:CACHED], self.names[CACHED:]
        self.digests = {}
        self.eligible = list(self.cached)
        self.attempted = self.ok = 0
        self.durations = []
        self.durations_by_name = collections.defaultdict(list)
        self.bytes = 0
        self.failures = collections.Counter()
        self.failures_on = collections.Counter()  # (replica, reason)
        self.failed_by_name = collections.defaultdict(list)  # name -> [(time, step, why)]
        self.ok_by_name = collections.defaultdict(list)  # name -> [time]
        self.retried = self.retried_ok = self.retried_unexpected = 0
        self.retry_reasons = collections.Counter()
        self.idle_open = 0
        self.idle_reopened = 0
        self.idle_min = None
        self.down_window = None  # (killed at, ready again at)
        self.dropped = {}  # name -> time of the collection that dropped it
        self.gc_lines = []
        self.unknown_dropped = 0
        self.stop_at = None

    # ---------- phases ----------

    async def prepare(self):
        """The 50 cached images, built through both replicas, two at a time."""
        queue = list(enumerate(self.cached))

        async def worker(w):
            while queue:
                i, name = queue.pop(0)
                conn = Connection(self.replicas[i % 2].port, f"127.0.2.{2 + w}")
                try:
                    self.digests[name], _ = await pull(conn, name)
                except (Down, Failed) as error:
                    raise Abort(f"building {name} failed: {error}")
                finally:
                    conn.close()

        started = now()
        await asyncio.gather(*(worker(w) for w in range(2)))
        print(f"built {len(self.cached)} images in {now() - started:.1f} s", flush=True)
        # Image keys, from the records' manifest digests.
        by_digest = {d: n for n, d in self.digests.items()}
        if len(by_digest) != len(self.digests):
            raise Abort("two image names gave the same manifest: choose other names")
        self.key_name = {}
        folder = os.path.join(self.storage, "cache/images")
        for key in os.listdir(folder):
            record = json.load(open(os.path.join(folder, key)))
            for _, m in record["manifests"]:
                if m["digest"] in by_digest:
                    self.key_name[key] = by_digest[m["digest"]]
        self.name_key = {n: k for k, n in self.key_name.items()}
        missing = [n for n in self.cached if n not in self.name_key]
        if missing:
            raise Abort(f"no image record found for {missing}")
        order = list(self.cached)
        random.Random(SEED + 1).shuffle(order)
        self.groups = [order[:DROPPED_PER_GC], order[DROPPED_PER_GC:2 * DROPPED_PER_GC]]

    async def client(self, i):
        rng = random.Random(SEED * 1000 + i)
        source = f"127.0.{i // 250}.{2 + i % 250}"
        home = i % 2
        conns = [Connection(r.port, source) for r in self.replicas]
        await asyncio.sleep(rng.uniform(0, THINK[1]))
        try:
            while now() < self.stop_at:
                name = rng.choice(self.eligible)
                self.attempted += 1
                started = now()
                on = self.replicas[home].name
                try:
                    try:
                        digest, size = await pull(conns[home], name)
                    except Down as down:
                        self.retried += 1
                        self.retry_reasons[f"{down.step}: {down.why}"] += 1
                        expected = home == 0 and self.down_window is not None and (
                            self.down_window[1] is None or now() <= self.down_window[1] + 1)
                        if not expected:
                            self.retried_unexpected += 1
                        on = self.replicas[1 - home].name
                        try:
                            digest, size = await pull(conns[1 - home], name)
                        except Down as again:
                            raise Failed(again.step, f"{again.why} (on the retry too)") from None
                        self.retried_ok += 1
                    self.ok += 1
                    self.bytes += size
                    self.durations.append(now() - started)
                    self.durations_by_name[name].append(now() - started)
                    self.ok_by_name[name].append(now())
                except Failed as failed:
                    self.failures[f"{failed.step}: {failed.why}"] += 1
                    self.failures_on[(on, f"{failed.step}: {failed.why}")] += 1
                    self.failed_by_name[name].append((now(), failed.step, failed.why))
                await asyncio.sleep(rng.uniform(*THINK))
        finally:
            for conn in conns:
                conn.close()

    async def idle(self, j):
        replica = self.replicas[j % 2]
        source = f"127.0.{10 + j // 250}.{2 + j % 250}"
        first = True
        while now() < self.stop_at:
            conn = Connection(replica.port, source)
            try:
                status, *_ = await conn.request("GET", "/v2/", "idle")
                if status != 200:
                    raise Failed("idle", status)
            except (Down, Failed):
                conn.close()
                await asyncio.sleep(0.5)
                continue
            if conn.reader is None:
                continue
            if not first:
                self.idle_reopened += 1
            first = False
            self.idle_open += 1
            try:
                left = self.stop_at - now()
                await asyncio.wait_for(conn.reader.read(1), max(left, 0.01))
            except (asyncio.TimeoutError, ConnectionError, OSError):
                pass
            finally:
                self.idle_open -= 1
                conn.close()

    async def sampler(self):
        while True:
            for replica in self.replicas:
                replica.sample()
            window = self.down_window
            if self.stop_at and now() < self.stop_at and self.measuring and not (
                    window and (window[1] is None or now() < window[1] + 5)):
                self.idle_min = self.idle_open if self.idle_min is None else min(self.idle_min, self.idle_open)
            await asyncio.sleep(0.5)

    async def collect(self, group):
        """Ages `group`'s last pulls, then runs `nixery gc` to its end."""
        for name in group:
            with open(os.path.join(self.storage, "cache/pulled", self.name_key[name]), "w") as f:
                f.write(json.dumps({"at": LONG_AGO}))
        env = dict(os.environ, **self.env)
        deadline = now() + 60
        print(f"t={now() - self.t0:.0f}s gc starts, {len(group)} images aged", flush=True)
        while True:
            started = now()
            proc = await asyncio.create_subprocess_exec(
                self.binary, "gc", "--keep-pulled-within", "1h", "--grace", "0s", env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            out = (await proc.communicate())[0].decode()
            if "gc busy" in out and now() < deadline:
                await asyncio.sleep(1)
                continue
            break
        lines = out.strip().splitlines()
        for line in lines:
            if line.startswith("gc: drop image "):
                key = line.split()[3]
                if key in self.key_name:
                    self.dropped.setdefault(self.key_name[key], started)
                else:
                    self.unknown_dropped += 1
        self.gc_lines.append(lines[-1] if lines else "(no output)")
        print(f"t={started - self.t0:.0f}s gc ({now() - started:.1f} s, exit {proc.returncode}): "
              f"{lines[-1] if lines else out}", flush=True)

    async def churn(self):
        replica = self.replicas[0]
        killed = now()
        self.down_window = (killed, None)
        os.kill(replica.proc.pid, signal.SIGKILL)
        replica.proc.wait()
        replica.up = False
        print(f"t={killed - self.t0:.0f}s replica A killed (-9)", flush=True)
        await asyncio.sleep(3)
        replica.start()
        await replica.ready()
        self.restarted = now()
        self.down_window = (killed, self.restarted)
        self.killed_wall = time.time() - (now() - killed)
        print(f"t={self.restarted - self.t0:.0f}s replica A serving again", flush=True)

    async def release(self):
        for j, name in enumerate(self.new):
            await asyncio.sleep(max(0.0, self.t0 + self.duration * (0.05 + 0.8 * j / NEW) - now()))
            self.eligible.append(name)

    async def at(self, fraction, job):
        await asyncio.sleep(max(0.0, self.t0 + self.duration * fraction - now()))
        await job

    async def run(self):
        self.measuring = False
        for replica in self.replicas:
            replica.start()
        for replica in self.replicas:
            await replica.ready()
        sampler = asyncio.create_task(self.sampler())
        await self.prepare()
        # Idle connections first, then the clients.
        self.stop_at = now() + self.duration + 3600
        idle = [asyncio.create_task(self.idle(j)) for j in range(IDLE)]
        deadline = now() + 30
        while self.idle_open < IDLE and now() < deadline:
            await asyncio.sleep(0.1)
        print(f"{self.idle_open} idle connections open", flush=True)
        self.t0 = now()
        self.cpu0 = sum(os.times()[:2])
        self.stop_at = self.t0 + self.duration
        self.measuring = True
        clients = [asyncio.create_task(self.client(i)) for i in range(CLIENTS)]
        events = [
            asyncio.create_task(self.release()),
            asyncio.create_task(self.at(0.20, self.collect(self.groups[0]))),
            asyncio.create_task(self.at(0.45, self.churn())),
            asyncio.create_task(self.at(0.65, self.collect(self.groups[1]))),
        ]
        await asyncio.gather(*events)
        await asyncio.sleep(max(0.0, self.stop_at - now()))
        self.measuring = False
        done, pending = await asyncio.wait(clients, timeout=DRAIN_TIMEOUT)
        for task in pending:
            task.cancel()
            self.failures["drain: unfinished after the phase"] += 1
        for task in done:
            if task.exception():
                raise task.exception()
        self.elapsed = now() - self.t0
        self.cpu = sum(os.times()[:2]) - self.cpu0
        for task in idle:
            task.cancel()
        await asyncio.gather(*idle, return_exceptions=True)
        self.metrics = {}
        for replica in self.replicas:
            conn = Connection(replica.port, "127.0.0.1")
            try:
                _, _, body, _, _ = await conn.request("GET", "/metrics", "metrics", keep=True)
                self.metrics[replica.name] = body.decode()
            except (Down, Failed):
                self.metrics[replica.name] = ""
            conn.close()
        sampler.cancel()
        for replica in self.replicas:
            replica.sample()

    def stop(self):
        clean = True
        for replica in self.replicas:
            if replica.proc and replica.proc.poll() is None:
                replica.proc.terminate()
        for replica in self.replicas:
            if replica.proc:
                try:
                    replica.proc.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    replica.proc.kill()
                    replica.proc.wait()
                    clean = False
        return clean

    # ---------- afterwards ----------

    def check_storage(self):
        return check_storage(self.storage, getattr(self, "killed_wall", None))



    def report(self, clean_stop):
        problems, examples, orphans, left_by_kill, blob_count = self.check_storage()
        print()
        durations = sorted(self.durations)

        def pct(p, durations=durations):
            return durations[min(len(durations) - 1, int(p * len(durations)))] * 1000 if durations else float("nan")

        # Pulls of the cached images no collection dropped: no build in them.
        steady = sorted(d for n in self.cached if n not in self.dropped for d in self.durations_by_name.get(n, []))

        failed = sum(self.failures.values())
        # A dropped image's first pull after its drop may fail (README); any other failure counts.
        allowed = sum(1 for name, at in self.dropped.items()
                      if any(t >= at for t, _, _ in self.failed_by_name.get(name, [])))
        failed_dropped = sum(sum(1 for t, _, _ in self.failed_by_name.get(n, []) if t >= at)
                             for n, at in self.dropped.items())
        repulled = sum(1 for name, at in self.dropped.items() if any(t > at for t in self.ok_by_name.get(name, [])))
        # Built again: the image record is back in storage.
        records = set(os.listdir(os.path.join(self.storage, "cache/images")))
        rebuilt = sum(1 for name in self.dropped if self.name_key[name] in records)
        unexplained = failed - allowed
        new_ok = sum(1 for n in self.new if self.ok_by_name.get(n))
        print(f"measured phase: {self.elapsed:.0f} s, {CLIENTS} clients, {IDLE} idle connections;"
              f" {self.attempted} pulls attempted, {self.ok} succeeded"
              f" ({self.ok / self.elapsed:.1f}/s, {self.bytes / 2**20:.0f} MiB checked),"
              f" {failed} failed, {self.retried} retried on the other replica ({self.retried_ok} of them then succeeded,"
              f" {self.retried_unexpected} while the first replica was up)")
        print(f"pull time: p50 {pct(0.50):.0f} ms, p99 {pct(0.99):.0f} ms, max {pct(1.0):.0f} ms;"
              f" of the {len(steady)} pulls of cached images no collection dropped: p50 {pct(0.5, steady):.0f} ms,"
              f" p99 {pct(0.99, steady):.0f} ms, max {pct(1.0, steady):.0f} ms")
        for reason, n in self.retry_reasons.most_common():
            print(f"  retried after {reason}: {n}")
        for reason, n in self.failures.most_common():
            print(f"  failed at {reason}: {n}"
                  + "".join(f", {m} on {r}" for (r, why), m in sorted(self.failures_on.items()) if why == reason))
        print(f"collections: {len(self.gc_lines)}, dropping {len(self.dropped)} of the images clients pull"
              f" ({self.unknown_dropped} other images); {failed_dropped} failed pulls of dropped images after their drop"
              f" ({allowed} of them allowed: the first per image), {failed - failed_dropped} of other images; {repulled} of {len(self.dropped)}"
              f" dropped images pulled again successfully; {new_ok} of {NEW} new images pulled")
        for name in sorted(self.dropped):
            fails = [f for f in self.failed_by_name.get(name, []) if f[0] >= self.dropped[name]]
            oks = [t for t in self.ok_by_name.get(name, []) if t > self.dropped[name]]
            back = "record in storage again" if self.name_key[name] in records else "NO record in storage at the end"
            print(f"  dropped {name} ({back}): {len(fails)} failed pulls after the drop, {len(oks)} good ones"
                  + (f", the first good one {oks[0] - self.dropped[name]:.1f} s after the collection began" if oks else "")
                  + (f", the last failed one {self.t0 + self.duration - fails[-1][0]:.1f} s before the phase's end" if fails else ""))
        print(f"idle connections: at least {self.idle_min} of {IDLE} open outside replica A's restart;"
              f" {self.idle_reopened} opened again")
        for replica in self.replicas:
            for n, life in enumerate(replica.lives, 1):
                print(f"replica {replica.name} (run {n}, pid {life['pid']}): peak RSS {life['hwm_kib'] / 1024:.0f} MiB,"
                      f" at most {life['fds']} open files, {life['cpu_s']:.0f} CPU s (builds before the phase included)")
        print(f"the load generator (one python process) used {self.cpu:.0f} CPU s in the {self.elapsed:.0f} s")
        for name, text in self.metrics.items():
            wanted = ("nixery_builds_started_total", "nixery_builds_failed_total", "nixery_build_lease_takeovers_total")
            got = [line for line in text.splitlines() if line.split(" ")[0] in wanted]
            print(f"replica {name} metrics at the end: {', '.join(got) or '(none)'}")
        print(f"storage: {blob_count} blobs checked; {sum(problems.values())} problems;"
              f" {left_by_kill} staging files left by the killed replica; records without an image record:"
              f" {len(orphans['pulled'])} last-pull, {len(orphans['plans'])} plans; stopped cleanly: {clean_stop}")
        for key in orphans["pulled"]:
            print(f"  a last-pull record but no image record: {self.key_name.get(key, key)}")
        for kind, n in problems.most_common():
            print(f"  {kind}: {n} (e.g. {examples[kind]})")
        storage_problems = sum(problems.values())
        goal = unexplained == 0 and storage_problems == 0 and self.ok > 0
        peak = lambda r: round(max(l["hwm_kib"] for l in r.lives) / 1024)
        fds = lambda r: max(l["fds"] for l in r.lives)
        breakdown = ";".join(f"{k.replace(' ', '_')}={v}" for k, v in self.failures.most_common()) or "none"
        a, b = self.replicas
        print(f"pulls={self.attempted} ok={self.ok} failed={failed} failed_allowed={allowed}"
              f" failed_unexplained={unexplained} failed_dropped={failed_dropped} retried={self.retried} retried_ok={self.retried_ok}"
              f" retried_while_up={self.retried_unexpected} p50_ms={pct(0.5):.0f} p99_ms={pct(0.99):.0f}"
              f" kept_p50_ms={pct(0.5, steady):.0f} kept_p99_ms={pct(0.99, steady):.0f}"
              f" pulls_per_s={self.ok / self.elapsed:.1f} images_dropped={len(self.dropped)}"
              f" dropped_repulled={repulled} dropped_rebuilt={rebuilt} new_pulled={new_ok} idle_open_min={self.idle_min}"
              f" rss_a_mib={peak(a)} rss_b_mib={peak(b)} fds_a={fds(a)} fds_b={fds(b)}"
              f" storage_problems={storage_problems} staging_left_by_kill={left_by_kill}"
              f" failures={breakdown} goal_met={'yes' if goal else 'no'}")


def main():
    if sys.argv[1] == "--check":
        problems, examples, orphans, _, blobs = check_storage(sys.argv[2])
        for kind, n in problems.most_common():
            print(f"{kind}: {n} (e.g. {examples[kind]})")
        print(f"blobs={blobs} storage_problems={sum(problems.values())}")
        sys.exit(1 if problems else 0)
    binary, pkgs, work = sys.argv[1], sys.argv[2], sys.argv[3]
    duration = float(sys.argv[4]) if len(sys.argv) > 4 else 90
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    bench = Bench(binary, pkgs, work, duration)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        asyncio.run(bench.run())
    except Abort as error:
        bench.stop()
        sys.exit(f"bench-churn: {error}")
    except BaseException:
        bench.stop()
        raise
    bench.report(bench.stop())


if __name__ == "__main__":
    main()
