"""The default against LiteLLM doing the same job (issues 6, 17): the same chat completion load
against a fast fake upstream directly, through spendledger exactly as the README starts it (`serve`,
its publisher child delivering; real PostgreSQL, a generated key, a customer with a budget, Lago and
webhook sinks on: admission, holds, ledger writes and outbox rows all on the path), through the floor
(scripts/bench/floor_app.py `insert`: the least a proxy that commits each request's usage adds) and
through the LiteLLM proxy from PyPI on the same upstream with the same callbacks (Lago, webhook
alerting) on the same fake receivers. The headline is a table of ratios from this one run against
issue 17's targets.

`wrk -t1 -c64` and `-c1` (POST, Lua body: scripts/bench/post.lua), alternating direct → spendledger →
floor → LiteLLM, --rounds times each after a warm-up. CPU per process from psutil (process trees, reaped
children included), the machine's from /proc/stat. Then the checks: no socket error, timeout or
non-2xx in any run; the ledger holds exactly one UsageRecorded per request spendledger forwarded and
answered (= the fake upstream's count for spendledger's credential; wrk's completed requests plus
those in flight when wrk stopped reading), all of them successes, and the outbox delivered one Lago
event and one webhook for each. Last a py-spy profile of spendledger under 64 connections, summarised
in docs/profile-proxy.txt. Writes "## Proxy vs direct vs LiteLLM (issue 6)" of docs/benchmarks.md.

    .venv/bin/python scripts/bench/proxy.py [--duration 10] [--skip-litellm] [--workers 1]
        [--rounds 2] [--warmup 5] [--no-profile] [--publisher child|separate|inline] [--litellm-bare]

Needs `wrk` (`apt-get install wrk`). Bench-only tools live in .bench/ (git-ignored):
    python3 -m venv .bench/litellm && .bench/litellm/bin/pip install 'litellm[proxy]==1.106.2'
    python3 -m venv .bench/tools && .bench/tools/bin/pip install py-spy
The fakes (upstream, Lago and webhook receivers) are scripts/bench/fake_upstream.py, on uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx

try:
    import psutil
except ImportError:  # read /proc instead
    psutil = None

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench.fake_upstream import LITELLM_WEBHOOK_PATH
from scripts.bench.report import write_section
from spendledger.ledger.db import EmbeddedDatabase

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TITLE = "Proxy: the default against LiteLLM doing the same job (issues 6, 17)"
BENCH = PROJECT_ROOT / "scripts" / "bench"
LUA = BENCH / "post.lua"
PROFILE = PROJECT_ROOT / "docs" / "profile-proxy.txt"
TOOLS = PROJECT_ROOT / ".bench" / "tools" / "bin"
LITELLM = PROJECT_ROOT / ".bench" / "litellm" / "bin" / "litellm"
GRANIAN_IN_VENV = PROJECT_ROOT / ".venv" / "bin" / "granian"
# The processes under test, by target name (CPU column "proxy" of each run is its own).
LITELLM_BARE = "litellm, no callbacks"
FLOOR = "floor"
PROXIES = ("spendledger", "spendledger on granian", FLOOR, "litellm", LITELLM_BARE)
# `python -m spendledger.api` from this checkout (not the console script, which runs wherever the package was
# installed from), so a second checkout can be benchmarked against this one.
SPENDLEDGER = [sys.executable, "-m", "spendledger.api"]
LITELLM_VERSION = "1.108.7"
MASTER_KEY = "sk-bench-2f9a6c1e8d4b7035"  # not sk-1234: spendledger refuses a publicly known key
CUSTOMER = "bench-customer"
MODEL = "fake-openai-endpoint"
SL_UPSTREAM_KEY = "spendledger-upstream"  # the fake upstream counts requests by these credentials
LITELLM_UPSTREAM_KEY = "litellm-upstream"
LITELLM_BARE_UPSTREAM_KEY = "litellm-bare-upstream"
FLOOR_UPSTREAM_KEY = "floor-upstream"  # the fake upstream counts the floor app's requests apart
FLOOR_MODE = "insert"  # scripts/bench/floor_app.py: the HTTP path and one durable append per request
LITELLM_LAGO_KEY = "litellm-lago-key"
DIRECT_KEY = "direct"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
CONNECTIONS = (64, 1)
WRK_TIMEOUT = "30s"
PRICES = "      input_cost_per_token: 0.0000015\n      output_cost_per_token: 0.000002\n"


def body(customer: str) -> str:
    return json.dumps(
        {
            "model": MODEL,
            "user": customer,
            "max_tokens": 64,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What time is it in Paris right now?"},
            ],
        },
        separators=(",", ":"),
    )


def model_list(upstream: str, api_key: str) -> str:
    return (
        f"model_list:\n  - model_name: {MODEL}\n    litellm_params:\n      model: openai/fake\n"
        f"      api_key: {api_key}\n      api_base: {upstream}\n    model_info:\n{PRICES}"
    )


def spendledger_config(upstream: str, webhooks: bool = True) -> str:
    alerting = '\n  alerting: ["webhook"]' if webhooks else ""
    return (
        model_list(upstream, SL_UPSTREAM_KEY)
        + 'litellm_settings:\n  callbacks: ["lago"]\n'
        + f"general_settings:\n  master_key: {MASTER_KEY}{alerting}\n"
    )


def litellm_config(upstream: str, callbacks: bool = True) -> str:
    """LiteLLM doing spendledger's job: a Lago event and a `spend_tracked` webhook per request (its
    Lago callback and webhook alerting, on the same fake receivers); without `callbacks`, neither."""
    if not callbacks:
        return model_list(upstream, LITELLM_BARE_UPSTREAM_KEY) + f"general_settings:\n  master_key: {MASTER_KEY}\n"
    return (
        model_list(upstream, LITELLM_UPSTREAM_KEY)
        + 'litellm_settings:\n  callbacks: ["lago"]\n'
        + f'general_settings:\n  master_key: {MASTER_KEY}\n  alerting: ["webhook"]\n'
    )


def litellm_env(sinks_url: str) -> dict[str, str]:
    return {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
            "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true", "LITELLM_LOG": "ERROR",
            "LAGO_API_BASE": sinks_url, "LAGO_API_KEY": LITELLM_LAGO_KEY, "LAGO_API_EVENT_CODE": "llm_usage",
            "WEBHOOK_URL": sinks_url + LITELLM_WEBHOOK_PATH}  # fmt: skip


# --- processes ---


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self, tail: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]


def py_spy() -> str | None:
    return str(TOOLS / "py-spy") if (TOOLS / "py-spy").exists() else shutil.which("py-spy")


@contextlib.contextmanager
def started(
    name: str, argv: list[str], workdir: Path, url: str, ready: str, env: dict[str, str] | None = None,
    timeout_s: float = 60.0, cwd: Path | None = None,
) -> Iterator[Service]:  # fmt: skip
    """Start `argv`, wait until GET `url + ready` answers 200, stop it with SIGTERM (its whole process
    group with SIGKILL after 20 s)."""
    log_path = workdir / f"{name}.log"
    process = _spawn(argv, log_path, env or {}, cwd or PROJECT_ROOT)
    service = Service(name, process, url, log_path)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise SystemExit(f"{name} exited with {process.returncode}:\n{service.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + ready, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} did not become ready in {timeout_s:.0f} s:\n{service.log()}")
            time.sleep(0.2)
        yield service
    finally:
        _stop(process)


@contextlib.contextmanager
def background(
    name: str, argv: list[str], workdir: Path, env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a process that serves no HTTP (the publisher); stop it as `started` does."""
    log_path = workdir / f"{name}.log"
    process = _spawn(argv, log_path, env, PROJECT_ROOT)
    try:
        time.sleep(1.0)
        if process.poll() is not None:
            raise SystemExit(f"{name} exited with {process.returncode}: {log_path.read_text()}")
        yield process
    finally:
        _stop(process)


def _spawn(argv: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """`argv` in a session of its own (so its workers can be stopped as a group), output to `log_path`."""
    with log_path.open("wb") as log_file:
        return subprocess.Popen(argv, cwd=cwd, env={**os.environ, **env}, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL to its whole process group after 20 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the group is its workers
            process.wait()


def fake_argv(app: str, port: int) -> list[str]:
    """The fast fake `app` (upstream or sinks) of scripts/bench/fake_upstream.py on `port`."""
    return [sys.executable, str(BENCH / "fake_upstream.py"), app, "--port", str(port)]


def fake(app: str, workdir: Path) -> contextlib.AbstractContextManager[Service]:
    port = free_port()
    return started(app, fake_argv(app, port), workdir, f"http://127.0.0.1:{port}", "/bench/stats")


def stats(service: Service) -> Counter[str]:
    return Counter(httpx.get(f"{service.url}/bench/stats", timeout=10).json())


# --- CPU ---


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process, its live descendants, and the children it has reaped."""
    if psutil is None:
        return _proc_tree_cpu(pid)
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = process.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def _proc_tree_cpu(pid: int) -> float:
    """tree_cpu from /proc/<pid>/stat: utime, stime, cutime, cstime (fields 14-17), children by ppid."""
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stats[int(entry.name)] = (entry / "stat").read_text().rpartition(")")[2].split()
    tree, todo = set[int](), [pid]
    while todo:
        current = todo.pop()
        if current in stats and current not in tree:
            tree.add(current)
            todo += [p for p, fields in stats.items() if int(fields[1]) == current]
    ticks = sum(int(v) for p in tree for v in stats[p][11:15])  # after "(comm)": state is [0], utime [11]
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> float:
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # idle and iowait are not busy


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once reaped
    return usage.ru_utime + usage.ru_stime


class Meter:
    """CPU seconds per group of processes over an interval, and the rest of the machine ("others")."""

    def __init__(self, groups: dict[str, int], nested: dict[str, str] | None = None) -> None:
        self.groups = groups
        self.nested = nested or {}  # group -> the group whose process tree holds it (counted once)

    def sample(self) -> dict[str, float]:
        sample = {name: tree_cpu(pid) for name, pid in self.groups.items()}
        for inner, outer in self.nested.items():
            sample[outer] -= sample[inner]
        sample["wrk"] = children_cpu()
        sample["bench"] = time.process_time()
        sample["machine"] = machine_cpu()
        sample["wall"] = time.perf_counter()
        return sample

    @staticmethod
    def cores(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        wall = after["wall"] - before["wall"]
        cores = {k: (after[k] - before[k]) / wall for k in before if k != "wall"}
        ours = sum(v for k, v in cores.items() if k != "machine")
        cores["others"] = max(0.0, cores.pop("machine") - ours)
        return cores

    def wait_quiet(self, limit: float, max_wait_s: float) -> float:
        """Wait (at most max_wait_s) until the rest of the machine uses under `limit` cores for 1 s;
        returns the seconds waited."""
        start = time.monotonic()
        while True:
            before = self.sample()
            time.sleep(1.0)
            if self.cores(before, self.sample())["others"] < limit or time.monotonic() - start > max_wait_s:
                return time.monotonic() - start - 1.0


# --- load ---


@dataclass
class Target:
    name: str
    url: str
    token: str
    body: str


@dataclass
class Run:
    target: str
    connections: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]
    cpu: dict[str, float]
    label: str = ""
    forwarded: int | None = None  # spendledger only: requests the upstream saw from it
    recorded: int | None = None  # spendledger only: UsageRecorded appended during the run
    drain_s: float | None = None  # spendledger only: until the outbox had nothing pending
    waits: Counter[str] | None = None  # spendledger only: PostgreSQL's active backends by wait event
    wait_samples: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def ok(self) -> int:
        return self.requests - self.errors["status"]


def wrk(target: Target, connections: int, seconds: float, meter: Meter) -> Run:
    env = {**os.environ, "BENCH_BODY": target.body, "BENCH_TOKEN": target.token}
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", WRK_TIMEOUT, "-s", str(LUA),
            f"{target.url}/chat/completions"]  # fmt: skip
    before = meter.sample()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    cpu = Meter.cores(before, meter.sample())
    found = re.search(r"^BENCH (\{.*\})$", done.stdout, re.M)
    if done.returncode != 0 or not found:
        raise SystemExit(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    r = json.loads(found[1])
    errors = {k: r[k] for k in ("connect", "read", "write", "timeout", "status")}
    return Run(target.name, connections, r["requests"], r["duration_us"] / 1e6, r["p50_us"] / 1000,
               r["p99_us"] / 1000, errors, cpu)  # fmt: skip


class WaitSampler:
    """PostgreSQL's active backends by wait event every 50 ms (`CPU` when not waiting), from a thread with a
    connection of its own."""

    SQL = (
        "select coalesce(wait_event_type || ':' || wait_event, 'CPU') as w, count(*) as n from pg_stat_activity "
        "where datname = current_database() and pid <> pg_backend_pid() and backend_type = 'client backend' "
        "and state <> 'idle' group by 1"
    )

    def __init__(self, url: str) -> None:
        self.url, self.waits, self.samples = url, Counter[str](), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._sample()), daemon=True)

    def __enter__(self) -> WaitSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    async def _sample(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            while not self._stop.is_set():
                self.waits.update({r["w"]: r["n"] for r in await conn.fetch(self.SQL)})
                self.samples += 1
                await asyncio.sleep(0.05)
        finally:
            await conn.close()


def waits_text(waits: Counter[str], samples: int) -> str:
    total = waits.total() or 1
    shares = ", ".join(f"{w} {n / total:.0%}" for w, n in waits.most_common(5))
    return f"{waits.total() / max(samples, 1):.1f} backends active on average: {shares}"


class Ledger:
    """A connection to spendledger's database, for the counts the checks need."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.loop.run_until_complete(asyncpg.connect(url))

    def value(self, sql: str) -> Any:
        return self.loop.run_until_complete(self.conn.fetchval(sql))

    def rows(self, sql: str) -> list[asyncpg.Record]:
        return self.loop.run_until_complete(self.conn.fetch(sql))

    def usage_count(self) -> int:
        return int(self.value("select count(*) from events where type = 'UsageRecorded'"))

    def pending(self) -> int:
        """Outbox rows not yet delivered, and events marked for webhooks whose rows the follower
        of the log has not written yet (migration 0012)."""
        return int(self.value(
            "select (select count(*) from outbox where state = 'pending') + (select count(*) from events e "
            "join projection_checkpoints c on c.name = 'webhooks' "
            "where (e.txid, e.position) > (c.last_txid, c.last_position) and e.metadata ? 'webhooks')"
        ))  # fmt: skip

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


def settle(ledger: Ledger, upstream: Service, timeout_s: float = 300.0) -> tuple[int, int, float]:
    """Wait until every request spendledger forwarded is recorded and the outbox has nothing pending
    (so a backlog of deliveries does not eat into the next run); (forwarded, recorded, seconds)."""
    start = time.monotonic()
    while True:
        forwarded, recorded = stats(upstream)[SL_UPSTREAM_KEY], ledger.usage_count()
        if forwarded == recorded and ledger.pending() == 0:
            return forwarded, recorded, time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise SystemExit(
                f"not settled after {timeout_s:.0f} s: forwarded {forwarded}, recorded {recorded}, "
                f"outbox pending {ledger.pending()}"
            )
        time.sleep(0.1)


# --- the profile ---

# Which part of spendledger a CPU sample is for: the innermost frame of its stack in one of these.
COMPONENTS: list[tuple[str, tuple[str, ...], str]] = [
    ("webhook deliveries (outbox)", ("ledger/sinks/webhook.py",),
     "one signed POST per request (httpx + Standard Webhooks HMAC), when the publisher runs in the profiled process"),
    ("Lago deliveries (outbox)", ("ledger/sinks/lago.py",), "one POST per batch of up to 100 events"),
    ("outbox claim / mark", ("ledger/outbox.py", "api/publishing.py", "api/metrics.py"),
     "the publisher's claim (FOR UPDATE SKIP LOCKED) and mark transactions, woken by NOTIFY"),
    ("record: group commit", ("ledger/usage.py",),
     "encode the batch of UsageRecorded, one `sl_record_usages` round trip, release the connection"),
    ("admission", ("ledger/admission.py", "api/enforcement.py"),
     "build and encode the Admission, one `sl_admit` round trip, release the connection"),
    ("upstream call", ("api/upstream.py",), "the httpx request to the provider and reading its answer"),
    ("proxy handler", ("api/proxy.py", "api/routes/proxy.py"),
     "decode the head, rewrite `model` in the body, read usage, build the event and the headers"),
    ("auth", ("api/auth.py", "api/keycache.py"), "hash the bearer key, look it up in the cache"),
    ("background tasks", ("projections/", "api/app.py", "ledger/"), "daily spend follower, hold sweeper"),
]  # fmt: skip
# Which library spends the CPU: the innermost frame of the sample's stack in one of these (frames of the
# standard library, such as asyncio's current_task under anyio, go to the library that called them).
PACKAGES: list[tuple[str, tuple[str, ...]]] = [
    (
        "HTTP client, transport: aiohttp (api/http_client.py)",
        ("aiohttp/", "api/http_client.py", "httpx_aiohttp/", "yarl/", "multidict/"),
    ),
    ("HTTP client, transport: httpcore, h11, anyio", ("httpcore/", "h11/", "anyio/", "sniffio/")),
    ("HTTP client: httpx's API layer (requests, headers, URLs)", ("httpx/",)),
    ("asyncpg (with its Cython protocol)", ("asyncpg/",)),
    ("Litestar", ("litestar/",)),
    ("uvicorn + httptools", ("uvicorn/", "httptools/")),
    ("webhook signing (standardwebhooks)", ("standardwebhooks/",)),
    ("prometheus_client", ("prometheus_client/",)),
    ("msgspec", ("msgspec/",)),
    ("structlog", ("structlog/",)),
    ("spendledger's own code", ("api/", "ledger/", "projections/")),
]
LOOP = "Runner.run (asyncio/runners.py"
EVENT_LOOP = "event loop: uvloop's C code (epoll, socket syscalls, loopback TCP)"
IDLE_LEAVES = ("Condition.wait (threading.py", "Queue.get (queue.py", "EpollSelector.select (selectors.py")


def _frames(raw: Path) -> Counter[tuple[str, ...]]:
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            frames = tuple(f for f in stack.split(";") if f and not f.startswith(("process ", "thread ")))
            if frames and not frames[-1].startswith(IDLE_LEAVES):  # threads py-spy took for busy
                stacks[frames] += int(count)
    return stacks


def _below_loop(frames: tuple[str, ...]) -> tuple[str, ...]:
    """The frames run by the event loop (not the server's start-up frames above it)."""
    loop = max((i for i, f in enumerate(frames) if f.startswith(LOOP)), default=-1)
    return frames[loop + 1 :]


def _component(frames: tuple[str, ...]) -> str:
    below = _below_loop(frames)
    for frame in reversed(below):
        for name, marks, _ in COMPONENTS:
            if any(f"({m}" in frame for m in marks):
                return name
    if not below:
        return EVENT_LOOP
    if any("(litestar/" in f or "(uvicorn/" in f for f in below):
        return "server and framework, outside our handlers"
    return "socket callbacks outside any handler (asyncpg, aiohttp protocols)"


def _package(frames: tuple[str, ...]) -> str:
    below = _below_loop(frames)
    if not below:
        return EVENT_LOOP
    for frame in reversed(below):
        path = frame.rpartition("(")[2]
        for name, marks in PACKAGES:
            if path.startswith(marks):
                return name
    return "standard library only (asyncio callbacks, threads)"


def summarise_profile(raw: Path, seconds: float, rps: float) -> tuple[str, list[tuple[str, float, str]]]:
    """The text of docs/profile-proxy.txt; the components and the packages with their shares."""
    stacks = _frames(raw)
    total = sum(stacks.values()) or 1
    own, inclusive, components, packages = Counter[str](), Counter[str](), Counter[str](), Counter[str]()
    for frames, n in stacks.items():
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
        components[_component(frames)] += n
        packages[_package(frames)] += n
    notes = {name: note for name, _, note in COMPONENTS} | {
        EVENT_LOOP: "uvloop runs in C: waiting is excluded, so this is socket reads and writes (the kernel's "
        "loopback TCP work included) and callback dispatch",
        "server and framework, outside our handlers": "uvicorn's protocol, Litestar's routing, dependency "
        "injection and response encoding",
        "socket callbacks outside any handler (asyncpg, aiohttp protocols)": "data arriving on PostgreSQL and "
        "HTTP client connections, parsed before the awaiting request resumes",
    }
    ranked = [(name, n / total, notes.get(name, "")) for name, n in components.most_common()]
    ranked += [(f"package: {name}", n / total, "") for name, n in packages.most_common()]
    lines = [
        f"py-spy profile of spendledger (scripts/bench/proxy.py) under wrk -c64 for {seconds:g} s "
        f"({rps:,.0f} req/s while profiled): {total:,} CPU samples at 100 Hz (blocking mode, so stacks are "
        "whole; idle excluded).",
        "",
        "By component of spendledger (innermost frame of ours in the stack):",
        *(f"  {n / total:6.1%}  {name}" for name, n in components.most_common()),
        "",
        "By library that spends the CPU (innermost library frame; stdlib frames go to their caller):",
        *(f"  {n / total:6.1%}  {name}" for name, n in packages.most_common()),
        "",
        "Top 40 functions by own time:",
        *(f"  {n / total:6.1%}  {frame}" for frame, n in own.most_common(40)),
        "",
        "Top 80 functions by inclusive time:",
        *(f"  {n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(80)),
        "",
        "Top 30 stacks (innermost last; frames above the first of ours cut):",
    ]
    for frames, n in stacks.most_common(30):
        cut = next(
            (i for i, f in enumerate(frames) if "(api/" in f or "(ledger/" in f or "(projections/" in f), 0
        )
        lines.append(f"  {n / total:6.1%}  " + " ; ".join(frames[cut:]))
    return "\n".join(lines) + "\n", ranked


def profile(spendledger: Service, target: Target, seconds: float, meter: Meter, workdir: Path,
            spy: str, workers: int) -> tuple[Run, Path]:  # fmt: skip
    raw = workdir / "profile.raw"
    argv = [spy, "record", "--pid", str(spendledger.process.pid), "--rate", "100", "--duration",
            str(max(1, int(seconds) - 1)), "--format", "raw", "-o", str(raw)]  # fmt: skip
    if workers > 1:
        argv.append("--subprocesses")
    spying = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        run = wrk(target, 64, seconds, meter)
    finally:
        _, err = spying.communicate(timeout=60)
    if spying.returncode != 0 or not raw.exists():
        raise SystemExit(f"py-spy failed ({spying.returncode}): {err.decode(errors='replace')}")
    run.label = "profiled"
    return run, raw


# --- the report ---


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


GROUPS = ("proxy", "publisher", "postgres", "upstream", "sinks", "wrk", "others")


def summary_rows(
    runs: list[Run], centre: Callable[[list[float]], float] = mean
) -> dict[tuple[str, int], dict[str, float]]:
    rows: dict[tuple[str, int], dict[str, float]] = {}
    for key in dict.fromkeys((r.target, r.connections) for r in runs):
        mine = [r for r in runs if (r.target, r.connections) == key]
        row = {"rps": centre([r.rps for r in mine]), "p50": centre([r.p50_ms for r in mine]),
               "p99": centre([r.p99_ms for r in mine])}  # fmt: skip
        for group in GROUPS:
            row[group] = centre([r.cpu.get(group, 0.0) for r in mine])
        rows[key] = row
    return rows


def proxy_cpu(run: Run) -> dict[str, float]:
    """The run's CPU with the proxy under test as `proxy` (the other proxy idles)."""
    cpu = dict(run.cpu)
    proxies = {name: cpu.pop(name, 0.0) for name in PROXIES}
    cpu["proxy"] = proxies.get(run.target, 0.0)
    return cpu


def markdown(runs: list[Run], profiled: Run | None, args: argparse.Namespace, checks: list[str],
             centres: list[tuple[str, float, str]], setup: str) -> str:  # fmt: skip
    for run in runs:
        run.cpu = proxy_cpu(run)
    rows = summary_rows(runs)
    out = [setup, "",
           "| target | conns | req/s | p50 ms | p99 ms | CPU proxy | CPU publisher | CPU postgres | CPU upstream "
           "| CPU sinks | CPU wrk | CPU others |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (target, conns), row in rows.items():
        proxy = f"{row['proxy']:.2f}" if target != "direct" else "–"
        out.append(
            f"| {target} | {conns} | {row['rps']:,.0f} | {row['p50']:.2f} | {row['p99']:.2f} | {proxy} | "
            f"{row.get('publisher', 0.0):.2f} | {row['postgres']:.2f} | {row['upstream']:.2f} | {row['sinks']:.2f} | {row['wrk']:.2f} | "
            f"{row['others']:.2f} |"
        )
    out += ["", "CPU in cores (1.00 = one core busy for the whole run), mean of the runs; `others` is the rest "
            "of the machine (other work on it skews every number)."]  # fmt: skip
    # The targets from each target's median round: one disturbed round (of either side) does not
    # decide a ratio, as it would a mean.
    out += ["", *headline(summary_rows(runs, statistics.median))]
    g64, g1 = rows.get(("spendledger on granian", 64)), rows.get(("spendledger on granian", 1))
    sl64, sl1 = rows.get(("spendledger", 64)), rows.get(("spendledger", 1))
    if g64 and sl64 and g1 and sl1:
        out.append(f"- ASGI server, the same app and database: granian {g64['rps']:,.0f} req/s at 64 connections "
                   f"({g64['proxy']:.2f} cores) vs uvicorn {sl64['rps']:,.0f} ({sl64['proxy']:.2f} cores); p50 at 1 "
                   f"connection {g1['p50']:.2f} vs {sl1['p50']:.2f} ms.")  # fmt: skip
    b64, l64 = rows.get((LITELLM_BARE, 64)), rows.get(("litellm", 64))
    if b64 and l64:
        out.append(f"- LiteLLM without callbacks (extra row, not the peer): {b64['rps']:,.0f} req/s at 64 connections, "
                   f"{b64['rps'] / l64['rps']:.2f}× LiteLLM with them.")  # fmt: skip
    out += ["", "Every run, in the order run:", "",
            "| # | target | conns | requests | req/s | p50 ms | p99 ms | errors | CPU proxy | CPU postgres "
            "| CPU others | ledger check |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for i, run in enumerate([*runs, *([profiled] if profiled else [])], 1):
        if profiled is run:
            run.cpu = proxy_cpu(run)
        errors = sum(run.errors.values())
        check = "–"
        if run.recorded is not None:
            check = (f"{run.recorded:,} recorded = {run.forwarded:,} forwarded = {run.ok:,} answered "
                     f"+ {run.recorded - run.ok} in flight at wrk's stop; outbox drained in {run.drain_s:.1f} s")  # fmt: skip
        name = f"{run.target} ({run.label})" if run.label else run.target
        proxy = f"{run.cpu['proxy']:.2f}" if run.target != "direct" else "–"
        out.append(f"| {i} | {name} | {run.connections} | {run.requests:,} | {run.rps:,.0f} | {run.p50_ms:.2f} "
                   f"| {run.p99_ms:.2f} | {errors} | {proxy} | {run.cpu['postgres']:.2f} | "
                   f"{run.cpu['others']:.2f} | {check} |")  # fmt: skip
    waits = pg_waits(runs)
    if waits:
        out += ["", "PostgreSQL during spendledger's runs (its active backends by wait event, sampled every 50 ms; "
                "`CPU` = not waiting):", "", *(f"- {conns} connection(s): {text}" for conns, (text, _) in waits.items())]  # fmt: skip
    out += ["", "Checks:", "", *(f"- {c}" for c in checks)]
    if centres and profiled:
        out += ["", f"### Profile of spendledger at 64 connections ({PROFILE.relative_to(PROJECT_ROOT)})", "",
                f"py-spy (100 Hz, blocking mode so that stacks are whole, idle excluded) of the spendledger process during an extra "
                f"{args.duration:g} s run at 64 connections ({profiled.rps:,.0f} req/s while profiled; not in the "
                "table above). A sample is charged to the innermost frame of spendledger's own code in its stack "
                "(first table), and to the innermost library frame, the library that spends the CPU (second):", "",
                "| component | share of CPU samples | what it is |", "|---|---|---|"]  # fmt: skip
        out += [
            f"| {name} | {share:.1%} | {note} |"
            for name, share, note in centres
            if not name.startswith("package: ")
        ]
        out += ["", "| library | share of CPU samples |", "|---|---|"]
        out += [f"| {name.removeprefix('package: ')} | {share:.1%} |" for name, share, _ in centres
                if name.startswith("package: ")]  # fmt: skip
        out += ["", *explain(dict((name, share) for name, share, _ in centres), rows, waits.get(64))]
    return "\n".join(out) + "\n"


# Issue 17's targets: the default `serve` against LiteLLM with the same callbacks, and the floor.
TARGET_THROUGHPUT = 20.0  # spendledger's req/s at 64 connections over LiteLLM's, at least
TARGET_P50 = 15.0  # LiteLLM's added p50 at 1 connection over spendledger's, at least
TARGET_P99 = 5.0  # the same at p99
TARGET_FLOOR = 1.5  # spendledger's added p50 at 1 connection over the floor's, at most


def headline(rows: dict[tuple[str, int], dict[str, float]]) -> list[str]:
    """The targets as ratios of this run's medians of rounds; added latency is a target's p50 (p99) at 1
    connection less the direct upstream's."""
    sl64, l64, d64, f64 = (rows.get((t, 64)) for t in ("spendledger", "litellm", "direct", FLOOR))
    sl1, l1, d1, f1 = (rows.get((t, 1)) for t in ("spendledger", "litellm", "direct", FLOOR))
    lines = ["| measure (this run, median round) | spendledger | LiteLLM, same callbacks | floor | direct | ratio | target |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip

    def verdict(met: bool) -> str:
        return "met" if met else "**not met**"

    if sl64 and l64 and d64 and f64:
        ratio = sl64["rps"] / l64["rps"]
        lines.append(f"| req/s at 64 connections | {sl64['rps']:,.0f} | {l64['rps']:,.0f} | {f64['rps']:,.0f} | "
                     f"{d64['rps']:,.0f} | **{ratio:.1f}×** LiteLLM's | ≥ {TARGET_THROUGHPUT:g}×: {verdict(ratio >= TARGET_THROUGHPUT)} |")  # fmt: skip
    if sl1 and l1 and d1 and f1:
        for point, target in (("p50", TARGET_P50), ("p99", TARGET_P99)):
            sl, li, fl = (r[point] - d1[point] for r in (sl1, l1, f1))
            ratio = li / sl if sl > 0 else float("inf")
            lines.append(f"| {point} added at 1 connection, ms | {sl:+.2f} | {li:+.2f} | {fl:+.2f} | {d1[point]:.2f} "
                         f"| **1/{ratio:.1f}** of LiteLLM's | ≤ 1/{target:g}: {verdict(ratio >= target)} |")  # fmt: skip
        sl, fl = sl1["p50"] - d1["p50"], f1["p50"] - d1["p50"]
        ratio = sl / fl if fl > 0 else float("inf")
        lines.append(f"| p50 added at 1 connection over the floor's | {sl:+.2f} | – | {fl:+.2f} | – | "
                     f"**{ratio:.2f}×** the floor's | ≤ {TARGET_FLOOR:g}×: {verdict(ratio <= TARGET_FLOOR)} |")  # fmt: skip
    return lines


def pg_waits(runs: list[Run]) -> dict[int, tuple[str, Counter[str]]]:
    out = {}
    for conns in CONNECTIONS:
        mine = [
            r for r in runs if r.target == "spendledger" and r.connections == conns and r.waits is not None
        ]
        if mine:
            waits = sum((r.waits for r in mine if r.waits is not None), Counter[str]())
            out[conns] = (waits_text(waits, sum(r.wait_samples for r in mine)), waits)
    return out


def explain(
    share: dict[str, float],
    rows: dict[tuple[str, int], dict[str, float]],
    waits: tuple[str, Counter[str]] | None,
) -> list[str]:
    """The top costs in words, with this run's numbers (the wording follows what the profile shows)."""

    def lib(name: str) -> float:
        return share.get("package: " + name, 0.0)

    aio, core, api = (lib(name) for name, _ in PACKAGES[:3])
    http, pg = aio + core + api, lib(PACKAGES[3][0])
    frame = lib("Litestar") + lib("uvicorn + httptools")
    sl = rows.get(("spendledger", 64), {})
    rps = max(sl.get("rps", 1.0), 1.0)
    machine = sum(sl.get(g, 0.0) for g in GROUPS)
    webhooks = share.get("webhook deliveries (outbox)", 0.0)
    cores = len(os.sched_getaffinity(0))
    lock = sum(n for w, n in (waits[1] if waits else Counter[str]()).items() if w.startswith("Lock:"))
    lock_share = lock / max((waits[1].total() if waits else 0), 1)
    wal_share = (waits[1]["IO:WALSync"] if waits else 0) / max((waits[1].total() if waits else 0), 1)
    if sl.get("proxy", 0.0) >= 0.9:
        bound = (
            f"**At 64 connections spendledger is bound by its one process's CPU** ({sl['proxy']:.2f} cores)"
        )
    elif machine < 0.9 * cores and waits and lock_share >= 0.1:
        bound = (
            f"**At 64 connections neither spendledger's process ({sl.get('proxy', 0):.2f} cores) nor the machine "
            f"({machine:.2f} of {cores} cores) is saturated: requests wait on PostgreSQL**, whose active backends "
            f"spend {lock_share:.0%} of their time waiting for a lock ({waits[0]}): settle batches (and the "
            "occasional lease or admission) take turns on the one customer's budget row"
        )
    elif machine < 0.9 * cores and waits:
        bound = (
            f"**At 64 connections neither spendledger's process ({sl.get('proxy', 0):.2f} cores) nor the machine "
            f"({machine:.2f} of {cores} cores) is saturated, and PostgreSQL's backends hardly wait for locks "
            f"({lock_share:.0%}; {waits[0]}): requests wait for their batch.** Admission takes no round trip (the "
            "process admits the customer's requests from a budget lease, ledger/leases.py); the process has one "
            "group commit (`sl_record_usages`) in flight at a time. A request waits for the batch in flight and then "
            "its own; the batches grow with the load, and what each batch costs per request is what bounds the "
            "rate. The budget row is locked only at the end of a settle batch, and the flush is not what they wait "
            f"for either (IO:WALSync {wal_share:.0%})"
        )
    else:
        bound = (
            f"**At 64 connections the machine is the limit**: {machine:.2f} of its {cores} cores busy, "
            f"spendledger's process {sl.get('proxy', 0):.2f}, PostgreSQL {sl.get('postgres', 0):.2f}, the fakes and wrk "
            "the rest"
        )
    transport = (
        "Its transport is aiohttp under httpx's API (api/http_client.py: prepared requests sent straight to the "
        "transport; see 'HTTP client cost per request' below)."
    )
    separate = sl.get("publisher", 0.0) > 0.0
    return [
        "What the profile says:",
        "",
        f"- {bound}. Per request: {sl.get('proxy', 0) / rps * 1000:.2f} ms of CPU in spendledger's process and "
        f"{sl.get('postgres', 0) / rps * 1000:.2f} ms in PostgreSQL; requests queue, which is why p50 at 64 "
        "connections is far above the single-connection latency.",
        f"- **The HTTP client: {http:.0%} of the CPU samples** (httpx's API layer {api:.0%}, "
        f"aiohttp {aio:.0%}, httpcore/h11/anyio {core:.0%}), for the upstream call "
        f"({share.get('upstream call', 0):.0%} of all samples) and the publisher's deliveries (webhooks "
        f"{webhooks:.0%}, Lago {share.get('Lago deliveries (outbox)', 0):.0%}). {transport}",
        (
            f"- **The outbox is delivered by its own process** (`serve`'s publisher child, or `spendledger publish`; "
            "column CPU publisher, its own process only: "
            f"{sl.get('publisher', 0) / rps * 1000:.2f} ms per request): `spend_tracked` is one signed POST per "
            "request, where Lago gets one POST per batch of up to 100 events."
            if separate
            else f"- **The webhook sink costs one full HTTP request per proxied request** ({webhooks:.0%} of the "
            "samples, on the same event loop as the requests): `spend_tracked` is one signed POST per request, "
            "where Lago gets one POST per batch of up to 100 events."
        ),
        f"- **asyncpg {pg:.0%}**: one group commit per batch of requests, one round trip (admissions come from "
        "the lease: a round trip only when one is granted or given back; pooled connections skip asyncpg's reset "
        "on release).",
        f"- Litestar and uvicorn {frame:.0%}; the event loop's C code {lib(EVENT_LOOP):.0%}; spendledger's own code "
        f"(the head decode, the body rewrite, the event, pricing, encoding) {lib(PACKAGES[-1][0]):.0%}. JSON work "
        "and logging are not where the time goes.",
    ]


# --- main ---


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each measured run")
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument("--workers", type=int, default=1, help="server processes of spendledger and LiteLLM")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each target per conns")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of warm-up per target")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="seconds to wait at most, before each run, for other work on the machine to calm")  # fmt: skip
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--connections", type=int, nargs="+", default=list(CONNECTIONS),
                        help="wrk's connection counts, in order (default: 64 1)")  # fmt: skip
    parser.add_argument("--granian", action="store_true",
                        help="also serve spendledger on granian (pip install granian into .venv), to compare "
                        "the ASGI servers in the same run")  # fmt: skip
    parser.add_argument("--no-webhooks", action="store_true",
                        help="spendledger without its webhook sink (Lago only): what one signed POST per request "
                        "costs the machine")  # fmt: skip
    parser.add_argument("--publisher", choices=["child", "separate", "inline"], default="child",
                        help="child (the default, as the README starts it): `serve` delivers from its publisher "
                        "child; separate: `serve --no-publisher` beside a `spendledger publish`; inline: from each "
                        "serving process's own event loop")  # fmt: skip
    parser.add_argument("--litellm-bare", action="store_true",
                        help="also LiteLLM without callbacks (no Lago, no webhooks): a labelled extra row")  # fmt: skip
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # stop every server we started, as Ctrl-C does
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
    if args.granian and not GRANIAN_IN_VENV.exists():
        raise SystemExit(
            "granian is missing from .venv: .venv/bin/pip install granian, or run without --granian"
        )
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get update && apt-get install -y wrk")
    if not args.skip_litellm and not LITELLM.exists():
        raise SystemExit(
            f"LiteLLM is missing ({LITELLM.relative_to(PROJECT_ROOT)}); create it with:\n"
            f"  python3 -m venv .bench/litellm && .bench/litellm/bin/pip install 'litellm[proxy]=={LITELLM_VERSION}'\n"
            "or run with --skip-litellm"
        )  # fmt: skip
    spy = None if args.no_profile else py_spy()
    if not args.no_profile and spy is None:
        raise SystemExit(
            "py-spy is missing; create it with:\n"
            "  python3 -m venv .bench/tools && .bench/tools/bin/pip install py-spy\n"
            "or run with --no-profile"
        )
    workdir = Path(tempfile.mkdtemp(prefix="sl-bench-proxy-", dir="/tmp"))
    database: EmbeddedDatabase | None = None
    try:
        database = EmbeddedDatabase(workdir / "pg")
        with contextlib.ExitStack() as stack:
            bench(args, workdir, database, stack, spy)
    finally:
        if database is not None:
            database.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def bench(args: argparse.Namespace, workdir: Path, database: EmbeddedDatabase, stack: contextlib.ExitStack,
          spy: str | None) -> None:  # fmt: skip
    upstream = stack.enter_context(fake("upstream", workdir))
    sinks = stack.enter_context(fake("sinks", workdir))
    spendledger, publisher, sl_target = start_spendledger(
        stack, workdir, database.url, upstream, sinks, args.workers, args.publisher, not args.no_webhooks
    )
    sl_env = spendledger_env(database.url, sinks)
    targets = [Target("direct", upstream.url, DIRECT_KEY, body(CUSTOMER)), sl_target]
    groups = {"spendledger": spendledger.process.pid, "upstream": upstream.process.pid, "sinks": sinks.process.pid,
              "postgres": int((database.data_dir / "postmaster.pid").read_text().split()[0])}  # fmt: skip
    nested = {}
    if publisher is not None:
        groups["publisher"] = publisher
        if args.publisher == "child":  # inside spendledger's process tree: its CPU shown apart, counted once
            nested["publisher"] = "spendledger"
    (workdir / "floor.yaml").write_text(model_list(upstream.url, FLOOR_UPSTREAM_KEY))
    floor = stack.enter_context(floor_app(FLOOR_MODE, workdir, database.url))
    targets.append(Target(FLOOR, floor.url, DIRECT_KEY, body(CUSTOMER)))
    groups[FLOOR] = floor.process.pid
    if args.granian:
        port = free_port()
        on_granian = stack.enter_context(started(
            "spendledger on granian",
            [str(GRANIAN_IN_VENV), "--interface", "asgi", "--factory", "--host", "127.0.0.1", "--port", str(port),
             "--workers", str(args.workers), "--loop", "uvloop", "--no-ws", "--log-level", "warning",
             "--working-dir", str(PROJECT_ROOT), "spendledger.api.app:create_app_from_env"],
            workdir, f"http://127.0.0.1:{port}", "/health/readiness",
            env={**sl_env, "SPENDLEDGER_CONFIG": str(workdir / "spendledger.yaml"),
                 "SPENDLEDGER_DATABASE_URL": database.url,
                 "SPENDLEDGER_PUBLISH": "1" if args.publisher == "inline" else "0"},
            timeout_s=120,
        ))  # fmt: skip
        targets.append(Target("spendledger on granian", on_granian.url, sl_target.token, body(CUSTOMER)))
        groups["spendledger on granian"] = on_granian.process.pid
    if not args.skip_litellm:
        for name, callbacks in [("litellm", True), *([(LITELLM_BARE, False)] if args.litellm_bare else [])]:
            config = workdir / f"{name.replace(', ', '-').replace(' ', '-')}.yaml"
            config.write_text(litellm_config(upstream.url, callbacks))
            port = free_port()
            litellm = stack.enter_context(started(
                name,
                [str(LITELLM), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                 "--num_workers", str(args.workers)],
                workdir, f"http://127.0.0.1:{port}", "/health/liveliness", env=litellm_env(sinks.url),
                timeout_s=180, cwd=workdir,
            ))  # fmt: skip
            targets.append(Target(name, litellm.url, MASTER_KEY, body(CUSTOMER)))
            groups[name] = litellm.process.pid
    for target in targets:  # one request each, read back: all answer the same completion with usage
        reply = httpx.post(f"{target.url}/chat/completions", content=target.body, timeout=60,
                           headers={"Authorization": f"Bearer {target.token}", "Content-Type": "application/json"})  # fmt: skip
        if reply.status_code != 200 or reply.json()["usage"]["total_tokens"] != 15:
            raise SystemExit(f"{target.name} answered {reply.status_code}: {reply.text[:500]}")
    meter, ledger = Meter(groups, nested), Ledger(database.url)
    pg_version = str(ledger.value("show server_version"))
    runs: list[Run] = []
    warm: list[Run] = []
    profiled: Run | None = None

    def measure(target: Target, conns: int, seconds: float) -> Run:
        waited = meter.wait_quiet(0.3, args.quiet_wait)
        recorded = ledger.usage_count()
        sampler = WaitSampler(database.url) if target.name.startswith("spendledger") else None
        with sampler or contextlib.nullcontext():
            run = wrk(target, conns, seconds, meter)
        if sampler is not None:
            run.waits, run.wait_samples = sampler.waits, sampler.samples
            _, total, run.drain_s = settle(ledger, upstream)
            run.forwarded = run.recorded = total - recorded
        print(f"{target.name:>11} c{conns:<3} {run.rps:9,.0f} req/s  p50 {run.p50_ms:7.2f} ms  p99 "
              f"{run.p99_ms:8.2f} ms  errors {sum(run.errors.values())}  proxy CPU "
              f"{run.cpu.get(target.name, 0):.2f}  pg {run.cpu['postgres']:.2f}  others "
              f"{run.cpu['others']:.2f}  (waited {waited:.0f} s for calm)", flush=True)  # fmt: skip
        return run

    settle(ledger, upstream)
    for target in targets:
        warm.append(measure(target, 64, args.warmup))
    for conns in args.connections:
        for _ in range(args.rounds):
            for target in targets:
                runs.append(measure(target, conns, args.duration))
    centres: list[tuple[str, float, str]] = []
    if spy:
        meter.wait_quiet(0.3, args.quiet_wait)
        before = ledger.usage_count()
        profiled, raw = profile(spendledger, targets[1], args.duration, meter, workdir, spy, args.workers)
        _, total, profiled.drain_s = settle(ledger, upstream)
        profiled.forwarded = profiled.recorded = total - before
        text, centres = summarise_profile(raw, args.duration, profiled.rps)
        if not args.no_doc:
            PROFILE.write_text(text)
        print(text)
    checks = final_checks(
        ledger, upstream, sinks, [*warm, *runs, *([profiled] if profiled else [])], not args.no_webhooks
    )
    ledger.close()
    setup = describe(args)
    command = f".venv/bin/python scripts/bench/proxy.py {' '.join(sys.argv[1:])}".strip()
    text = markdown(runs, profiled, args, checks, centres, setup)
    print(text)
    if not args.no_doc:
        write_section(TITLE, command, text, pg_version)
        print(f"wrote {TITLE!r} in docs/benchmarks.md")
    if any(c.startswith("FAILED") for c in checks):
        raise SystemExit(1)


def spendledger_env(database_url: str, sinks: Service) -> dict[str, str]:
    """spendledger's environment in the benchmarks: its database, Lago and the webhook on the fake sinks."""
    return {"DATABASE_URL": database_url, "LAGO_API_BASE": sinks.url, "LAGO_API_KEY": "bench-lago-key",
            "LAGO_API_EVENT_CODE": "llm_usage", "WEBHOOK_URL": f"{sinks.url}/webhook",
            "WEBHOOK_SECRET": WEBHOOK_SECRET}  # fmt: skip


def start_spendledger(
    stack: contextlib.ExitStack, workdir: Path, database_url: str, upstream: Service, sinks: Service,
    workers: int, publisher: str = "child", webhooks: bool = True,
) -> tuple[Service, int | None, Target]:  # fmt: skip
    """spendledger as the benchmarks run it — by default exactly as the README starts it (`serve`,
    which delivers from its publisher child); `separate`: `serve --no-publisher` beside a `spendledger
    publish`; `inline`: the publisher on each serving process's event loop (the pre-issue-17 default,
    SPENDLEDGER_PUBLISH=1); `none`: `serve --no-publisher` and nothing delivers — with a generated key and a customer with a budget. Returns the server,
    the publisher's pid (child or separate process) and the target they make."""
    (workdir / "spendledger.yaml").write_text(spendledger_config(upstream.url, webhooks))
    port = free_port()
    env = spendledger_env(database_url, sinks)
    argv = [*SPENDLEDGER, "serve", "--config", str(workdir / "spendledger.yaml"), "--host", "127.0.0.1",
            "--port", str(port), "--workers", str(workers)]  # fmt: skip
    if publisher == "inline":  # serve would start its child: instead, the app itself publishes
        argv = [sys.executable, "-m", "uvicorn", "--factory", "spendledger.api.app:create_app_from_env", "--host", "127.0.0.1",
                "--port", str(port), "--workers", str(workers), "--loop", "uvloop", "--http", "httptools",
                "--log-level", "warning", "--no-access-log"]  # fmt: skip
        env |= {"SPENDLEDGER_CONFIG": str(workdir / "spendledger.yaml"), "SPENDLEDGER_DATABASE_URL": database_url,
                "SPENDLEDGER_PUBLISH": "1"}  # fmt: skip
    elif publisher in ("separate", "none"):
        argv.append("--no-publisher")
    server = stack.enter_context(started(
        "spendledger", argv, workdir, f"http://127.0.0.1:{port}", "/health/readiness", env=env, timeout_s=120
    ))  # fmt: skip
    publisher_pid = None
    if publisher == "separate":
        publish = [*SPENDLEDGER, "publish", "--config", str(workdir / "spendledger.yaml")]
        publisher_pid = stack.enter_context(background("publisher", publish, workdir, env)).pid
    elif publisher == "child":
        publisher_pid = publisher_child(server.process.pid)
    admin = {"Authorization": f"Bearer {MASTER_KEY}"}
    # A key of its own each start (scripts/bench/variants.py starts several on one database).
    key = httpx.post(
        f"{server.url}/key/generate", json={"key_alias": f"bench-{port}"}, headers=admin, timeout=30
    )
    key.raise_for_status()
    known = httpx.get(f"{server.url}/customer/info", params={"end_user_id": CUSTOMER}, headers=admin, timeout=30)
    if known.status_code == 404:
        customer = httpx.post(f"{server.url}/customer/new", headers=admin, timeout=30,
                              json={"user_id": CUSTOMER, "max_budget": 1_000_000})  # fmt: skip
        customer.raise_for_status()
    return server, publisher_pid, Target("spendledger", server.url, key.json()["key"], body(CUSTOMER))


def publisher_child(server_pid: int, timeout_s: float = 30.0) -> int:
    """The pid of `serve`'s publisher child (`… -m spendledger.api publish …`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1]) if entry.name.isdigit() else 0
                if parent == server_pid and b"publish" in (entry / "cmdline").read_bytes().split(b"\0"):
                    return int(entry.name)
        time.sleep(0.2)
    raise SystemExit(f"spendledger serve (pid {server_pid}) started no publisher child in {timeout_s:.0f} s")


def floor_app(mode: str, workdir: Path, database_url: str) -> contextlib.AbstractContextManager[Service]:
    """scripts/bench/floor_app.py in `mode`, on the fake upstream (its config in workdir/floor.yaml)."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--factory", "scripts.bench.floor_app:create_app", "--host",
            "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--log-level",
            "warning", "--no-access-log"]  # fmt: skip
    env = {"FLOOR_MODE": mode, "FLOOR_CONFIG": str(workdir / "floor.yaml"), "DATABASE_URL": database_url}
    return started(f"floor {mode}", argv, workdir, f"http://127.0.0.1:{port}", "/health", env=env)


def final_checks(
    ledger: Ledger, upstream: Service, sinks: Service, runs: list[Run], webhooks: bool = True
) -> list[str]:
    checks = []
    bad = [r for r in runs if any(r.errors.values())]
    checks.append(
        f"{'FAILED' if bad else 'ok'}: no socket error, timeout (wrk --timeout {WRK_TIMEOUT}) or non-2xx answer "
        f"in any of the {len(runs)} runs (warm-ups and the profiled run included)"
        + "".join(f"; {r.target} c{r.connections}: {r.errors}" for r in bad)
    )  # fmt: skip
    forwarded = stats(upstream)[SL_UPSTREAM_KEY]
    rows = ledger.rows(
        "select data->>'status' as status, (data->>'http_status')::int as http, count(*) as n, "
        "count(distinct data->>'call_id') as calls from events where type = 'UsageRecorded' group by 1, 2"
    )
    recorded = sum(r["n"] for r in rows)
    successes = sum(r["n"] for r in rows if r["status"] == "success" and r["http"] == 200)
    distinct = sum(r["calls"] for r in rows)
    answered = sum(r.ok for r in runs if r.target.startswith("spendledger")) + 1  # + the smoke request
    in_flight = recorded - answered
    spendledger_runs = sum(1 for r in runs if r.target.startswith("spendledger"))
    ok = recorded == forwarded == successes == distinct and 0 <= in_flight <= 64 * spendledger_runs
    refused = ledger.value("select count(*) from events where type = 'RequestRefused'")
    checks.append(
        f"{'ok' if ok and not refused else 'FAILED'}: the ledger holds {recorded:,} UsageRecorded, one per request "
        f"spendledger forwarded ({forwarded:,} at the upstream), all successes with HTTP 200 and distinct call ids "
        f"({successes:,}, {distinct:,}); wrk read {answered:,} of their 2xx answers (smoke request included), the "
        f"other {in_flight} were in flight when wrk stopped reading (at most 64 per run); {refused} RequestRefused"
    )  # fmt: skip
    outbox = {(r["sink"], r["state"]): r["n"] for r in ledger.rows(
        "select sink, state, count(*) as n from outbox group by 1, 2")}  # fmt: skip
    received = stats(sinks)
    per_request = recorded if webhooks else None  # spend_tracked webhooks expected, or none at all
    ok = (outbox.get(("lago", "delivered")) == recorded and outbox.get(("webhook", "delivered")) == per_request
          and len(outbox) == (2 if webhooks else 1) and received["lago_events"] == recorded
          and received["webhooks"] == (per_request or 0))  # fmt: skip
    checks.append(
        f"{'ok' if ok else 'FAILED'}: outbox {dict(sorted(outbox.items()))}; the fake Lago received "
        f"{received['lago_events']:,} events in {received['lago_posts']:,} batches, the webhook receiver "
        f"{received['webhooks']:,} POSTs: one Lago event"
        + (" and one spend_tracked webhook per request" if webhooks else " per request (webhooks off)")
    )  # fmt: skip
    litellm = stats(upstream)[LITELLM_UPSTREAM_KEY]
    if litellm:
        same = received["litellm_lago_events"] == received["litellm_webhooks"] == litellm
        checks.append(
            f"{'ok' if same else 'NOTE'}: LiteLLM forwarded {litellm:,} requests (smoke request and warm-up included) "
            f"and sent {received['litellm_lago_events']:,} Lago events and {received['litellm_webhooks']:,} "
            "spend_tracked webhooks for them: " + ("one of each per request, the same job" if same else
            "not one of each per request; its rows do less than spendledger's")
        )  # fmt: skip
    return checks


def describe(args: argparse.Namespace) -> str:
    order = "direct → spendledger → floor" + ("" if args.skip_litellm else " → LiteLLM")
    litellm = (
        "" if args.skip_litellm else
        f" LiteLLM proxy {LITELLM_VERSION} from PyPI (own virtualenv .bench/litellm, `litellm --config "
        f"--num_workers {args.workers}`, offline with `LITELLM_LOCAL_MODEL_COST_MAP=True`, `LITELLM_LOG=ERROR`) "
        "serves the same model on the same upstream with the master key, doing the same job: "
        "`callbacks: [\"lago\"]` and `alerting: [\"webhook\"]` on the same fake receivers (one Lago event "
        "POSTed per request, and its `spend_tracked` webhook for the request's customer); it needs no database "
        "for those (so it keeps no budgets and no spend ledger)."
        + (" The extra row `litellm, no callbacks` is the same LiteLLM without them." if args.litellm_bare else "")
    )  # fmt: skip
    floor = (
        f" The floor (scripts/bench/floor_app.py, mode `{FLOOR_MODE}`): spendledger's server, framework and "
        "upstream client with only one durable one-row append per request after the upstream call — the least "
        "a proxy that commits each request's usage before answering adds."
    )
    return (
        "One machine runs everything: the fake OpenAI upstream (an asyncio protocol over httptools on uvloop, "
        "answers at once with usage), fake Lago and webhook receivers (the same, another process), spendledger "
        f"(`spendledger serve --config … --workers {args.workers}`: uvicorn, uvloop, httptools) on an embedded PostgreSQL 16, and wrk. spendledger serves a "
        "generated key; the body names a customer with a budget of 1,000,000 (admission holds on it — from a "
        "budget lease after the first request — and each settle draws from the hold); "
        + ("`callbacks: [\"lago\"]` and `alerting: [\"webhook\"]` (signed) are on, so every request appends a "
           "UsageRecorded with its Lago row, and the webhook follower of the log writes its `spend_tracked` "
           "row just after; " if not args.no_webhooks else
           "`callbacks: [\"lago\"]` is on and the webhook sink off (`--no-webhooks`), so every request appends a "
           "UsageRecorded and one outbox row; ")
        + {"child": "`serve`'s publisher child delivers them (the default: exactly the README's command).",
           "separate": "a `spendledger publish` process beside the server (`serve --no-publisher`) delivers them "
                       "(**not the default**: `--publisher separate`).",
           "inline": "the publisher on the serving process's own event loop delivers them (**not the default**: "
                     "`--publisher inline`, as `serve` did before issue 17)."}[args.publisher]
        + litellm + floor
        + f" Load: `wrk -t1 -c64|-c1 -d{args.duration:g}s --timeout {WRK_TIMEOUT} -s scripts/bench/post.lua`, "
        f"the same POST /chat/completions body (model, user, max_tokens 64, two messages) for all; after a "
        f"{args.warmup:g} s warm-up of each, runs alternate {order}, {args.rounds} rounds per "
        "connection count; before each run the script waits (up to "
        f"{args.quiet_wait:g} s) for the rest of the machine to use under 0.3 cores, and after each spendledger run "
        "until the ledger has every forwarded request and the outbox nothing pending."
    )  # fmt: skip


if __name__ == "__main__":
    main()
