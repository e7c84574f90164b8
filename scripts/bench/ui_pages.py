"""Admin UI pages (issue 20): each page answers in under 200 ms with 10,000 customers and 100,000 events.

A fresh embedded PostgreSQL is migrated and seeded through the ledger's own write path: budget tiers,
teams, internal users, keys and customers by the directory's commands (ledger/directory.py,
ledger/keys.py: each appends its event and projects it, as /budget/new, /customer/new … do), in
transactions of a few hundred on a few connections; then `--events` UsageRecorded events over the
last 30 days, skewed over the customers (Zipf: the biggest has thousands), several model groups,
priced as the proxy prices them (ledger/pricing.py `charge`), each with the budget periods admission
would have given it at its start (`sl_request_scopes`, `sl_period_start`), recorded in batches by
`record_usages` — `sl_record_usages`, the proxy's own settle: the events, their Lago rows, spend_totals
and budget_usage — and the daily spend follower caught up (projections/daily.py).

Then `spendledger serve` runs on that database (a master key of this run's own, Lago on the fake
sinks of scripts/bench/fake_upstream.py; its publisher child delivers the seeded Lago rows, which
are waited for), the script signs in as a browser does (GET /ui/login, POST it with the form's
`csrf_token`, the login cookie and the master key; the 303 sets the session cookie) and times each
page `--rounds` times after 3 warm-ups (the pages in turn, one connection, keep-alive). A page that
does not answer 200 is reported with its status and the start of its body instead.

    .venv/bin/python scripts/bench/ui_pages.py [--customers 10000] [--events 100000] [--rounds 30] [--write]

`--write` replaces the section "Admin UI pages (issue 20)" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import asyncpg
import httpx
import msgspec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench.proxy import Meter, Service, fake, free_port, started
from scripts.bench.report import write_section
from spendledger.api.publishing import outbox_rows_builder, recording_context
from spendledger.ledger import keys as key_commands
from spendledger.ledger.config import Settings, load_settings
from spendledger.ledger.db import EmbeddedDatabase, run_migrations
from spendledger.ledger.directory import create_customer, create_team, create_user, define_budget
from spendledger.ledger.events import BudgetDefined, CustomerCreated, KeyGenerated, TeamCreated, UserCreated
from spendledger.ledger.events import UsageRecorded as Usage
from spendledger.ledger.pricing import PriceBook, charge
from spendledger.ledger.tickets import OutboxRows
from spendledger.ledger.tokens import TokenUsage
from spendledger.ledger.usage import Recording, RecordingContext, record_usages
from spendledger.projections.daily import follow_once

SECTION: Final = "Admin UI pages (issue 20)"
ACTOR: Final = "master_key"  # what the management API names the master key's changes
DAYS: Final = 30
WARM_UPS: Final = 3
TARGET_MS: Final = 200.0
QUIET_CORES: Final = 0.3
BODY_SHOWN: Final = 300
DIRECTORY_CONNECTIONS: Final = 4
DIRECTORY_BATCH: Final = 250
USAGE_BATCH: Final = 1000
USAGE_CONNECTIONS: Final = 2
ZIPF: Final = 1.0  # customer of rank r gets a share ∝ 1 / r**ZIPF of the events
FAILURES: Final = 0.02  # share of requests the provider failed (recorded, cost 0)

# Budget tiers (/budget/new): id, max_budget, budget_duration, rpm_limit, share of the customers.
TIERS: Final = (
    ("tier-free", Decimal("5"), "1mo", 60, 40),
    ("tier-starter", Decimal("50"), "1mo", 300, 30),
    ("tier-pro", Decimal("500"), "1mo", 1000, 15),
    ("tier-team", Decimal("2000"), "7d", 3000, 8),
    ("tier-enterprise", Decimal("20000"), "1mo", None, 2),
)
OWN_BUDGET_SHARE: Final = 5  # percent of customers with limits of their own (customer-budget:<id>)
TEAMS: Final[tuple[tuple[str, str, Decimal | None, str | None], ...]] = (
    ("team-platform", "Platform", Decimal("5000"), "1mo"),
    ("team-research", "Research", Decimal("20000"), "1mo"),
    ("team-support", "Support bots", Decimal("1000"), "7d"),
    ("team-growth", "Growth", None, None),
)
USERS_PER_TEAM: Final = 3
KEYS_PER_USER: Final = 2
# Model groups: name, provider, upstream model, input and output price per token, share of requests.
MODELS: Final = (
    ("gpt-4o-mini", "openai", "gpt-4o-mini", "0.00000015", "0.0000006", 50),
    ("gpt-4o", "openai", "gpt-4o", "0.0000025", "0.00001", 20),
    ("claude-sonnet", "openrouter", "anthropic/claude-3.5-sonnet", "0.000003", "0.000015", 20),
    ("llama-70b", "openrouter", "meta-llama/llama-3.3-70b-instruct", "0.00000059", "0.00000079", 10),
)
WORDS: Final = (
    "Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Tyrell", "Soylent", "Cyberdyne",
    "Wonka", "Gringotts", "Vandelay", "Pied Piper", "Aperture", "Black Mesa", "Massive Dynamic", "Oscorp",
)  # fmt: skip
SUFFIXES: Final = ("Ltd", "GmbH", "Inc", "SAS", "BV", "Labs", "Studio", "Group")


def config_text(master_key: str) -> str:
    """The server's config.yaml: the seed's model groups (never called), Lago on, the master key."""
    models = "".join(
        f"  - model_name: {name}\n    litellm_params:\n      model: {provider}/{upstream}\n"
        f"      api_key: bench-upstream\n      api_base: http://127.0.0.1:9/{provider}\n"
        f"    model_info:\n      input_cost_per_token: {price_in}\n      output_cost_per_token: {price_out}\n"
        for name, provider, upstream, price_in, price_out, _ in MODELS
    )
    return (
        f"model_list:\n{models}"
        'litellm_settings:\n  callbacks: ["lago"]\n'
        f"general_settings:\n  master_key: {master_key}\n"
    )


def lago_env(sinks_url: str) -> dict[str, str]:
    return {"LAGO_API_BASE": sinks_url, "LAGO_API_KEY": "bench-lago-key", "LAGO_API_EVENT_CODE": "llm_usage"}


def customer_id(index: int, customers: int) -> str:
    return f"customer-{index:0{max(5, len(str(customers - 1)))}d}"


def search_text(customers: int) -> str:
    """A substring of the customer ids that about 1% of them hold: `-` and the leading digits of the
    middle customer's number (the aliases hold no digit)."""
    width = max(5, len(str(customers - 1)))
    tail = max(0, min(width - 1, round(math.log10(max(customers / 100, 1)))))
    return "-" + customer_id(customers // 2, customers).split("-")[1][: width - tail]


# --- seeding ------------------------------------------------------------------------------------


@dataclass
class Seeded:
    customers: int = 0
    events: int = 0
    budgets: int = 0
    teams: int = 0
    users: int = 0
    keys: int = 0
    directory_s: float = 0.0
    usage_s: float = 0.0
    daily_s: float = 0.0
    analyze_s: float = 0.0
    biggest: tuple[str, int] = ("", 0)
    smallest: tuple[str, int] = ("", 0)
    events_by_customer: Counter[str] = field(default_factory=Counter)

    @property
    def seconds(self) -> float:
        return self.directory_s + self.usage_s + self.daily_s + self.analyze_s


@dataclass(frozen=True)
class SeedKey:
    key_hash: str
    alias: str
    user_id: str | None
    team_id: str | None


Step = Callable[[int], None]  # advances a progress bar by n


def _no_progress(_: int) -> None:
    pass


async def _in_transactions(
    url: str, jobs: Sequence[Callable[[asyncpg.Connection], Awaitable[None]]], advance: Step
) -> None:
    """Run `jobs` in transactions of DIRECTORY_BATCH, spread over DIRECTORY_CONNECTIONS connections."""
    chunks = [jobs[i : i + DIRECTORY_BATCH] for i in range(0, len(jobs), DIRECTORY_BATCH)]
    queue: asyncio.Queue[Sequence[Callable[[asyncpg.Connection], Awaitable[None]]]] = asyncio.Queue()
    for chunk in chunks:
        queue.put_nowait(chunk)

    async def worker() -> None:
        conn = await asyncpg.connect(url)
        try:
            while not queue.empty():
                chunk = queue.get_nowait()
                async with conn.transaction():
                    for job in chunk:
                        await job(conn)
                advance(len(chunk))
        finally:
            await conn.close()

    await asyncio.gather(*(worker() for _ in range(min(DIRECTORY_CONNECTIONS, len(chunks)))))


async def seed_directory(
    url: str, customers: int, rng: random.Random, advance: Step = _no_progress
) -> tuple[list[SeedKey], dict[str, int]]:
    """Tiers, teams, users, keys (one transaction) and `customers` customers (in batches) through the
    directory's commands; the keys made, and the count of each kind of entity."""
    now = datetime.now(UTC)
    made: list[SeedKey] = []
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            for budget_id, max_budget, duration, rpm, _ in TIERS:
                event = BudgetDefined(budget_id=budget_id, max_budget=max_budget, budget_duration=duration,
                                      soft_budget=max_budget * Decimal("0.8"), rpm_limit=rpm)  # fmt: skip
                await define_budget(conn, event, ACTOR, now)
            for team_id, alias, team_budget, team_duration in TEAMS:
                await create_team(conn, TeamCreated(team_id=team_id, team_alias=alias, max_budget=team_budget,
                                                    budget_duration=team_duration), ACTOR, now)  # fmt: skip
                for u in range(USERS_PER_TEAM):
                    user_id = f"{team_id.removeprefix('team-')}-dev-{u}"
                    user = UserCreated(
                        user_id=user_id, user_email=f"{user_id}@example.com", user_role="internal_user",
                        max_budget=Decimal("500") if u == 0 else None, budget_duration="1mo" if u == 0 else None,
                    )  # fmt: skip
                    await create_user(conn, user, ACTOR, now)
                    for k in range(KEYS_PER_USER):
                        plaintext = key_commands.new_key()
                        alias = f"{user_id}-{'prod' if k == 0 else 'staging'}"
                        team = team_id if k == 0 else None  # a personal key besides the team's
                        spec = KeyGenerated(
                            key_hash=key_commands.hash_key(plaintext), key_name=key_commands.display_name(plaintext),
                            key_alias=alias, user_id=user_id, team_id=team,
                            max_budget=Decimal("100") if k else None, budget_duration="30d" if k else None,
                        )  # fmt: skip
                        await key_commands.generate_key(conn, spec, plaintext, ACTOR, now)
                        made.append(SeedKey(spec.key_hash, alias, user_id, team))
            for s in range(3):  # service keys of no user or team, such as a gateway's own apps
                plaintext = key_commands.new_key()
                spec = KeyGenerated(key_hash=key_commands.hash_key(plaintext),
                                    key_name=key_commands.display_name(plaintext), key_alias=f"service-{s}")  # fmt: skip
                await key_commands.generate_key(conn, spec, plaintext, ACTOR, now)
                made.append(SeedKey(spec.key_hash, f"service-{s}", None, None))
    finally:
        await conn.close()

    tiers = [t[0] for t in TIERS]
    weights = [t[4] for t in TIERS]
    own = 0

    def job(index: int) -> Callable[[asyncpg.Connection], Awaitable[None]]:
        nonlocal own
        user_id = customer_id(index, customers)
        alias = f"{rng.choice(WORDS)} {rng.choice(SUFFIXES)}" if rng.random() < 0.6 else None
        limits: dict[str, object] = {}
        tier: str | None = None
        if rng.randrange(100) < OWN_BUDGET_SHARE:
            limits = {"max_budget": Decimal(rng.choice((10, 25, 100, 250))), "budget_duration": "1mo"}
            own += 1
        else:
            tier = rng.choices(tiers, weights)[0]
        event = CustomerCreated(user_id=user_id, alias=alias, budget_id=tier)

        async def run(conn: asyncpg.Connection) -> None:
            await create_customer(conn, event, limits, ACTOR, now)

        return run

    jobs = [job(i) for i in range(customers)]
    await _in_transactions(url, jobs, advance)
    counts = {
        "budgets": len(TIERS) + own,
        "teams": len(TEAMS),
        "users": len(TEAMS) * USERS_PER_TEAM,
        "keys": len(made),
        "customers": customers,
    }
    return made, counts


_PERIODS: Final = """
select e.i, s.scope, s.scope_id, sl_period_start(s.anchor, s.budget_duration, e.at) as period
from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])
     with ordinality as e(key_hash, user_id, team_id, customer_id, at, i),
     sl_request_scopes(jsonb_build_object('key_hash', e.key_hash, 'user_id', e.user_id,
                                          'team_id', e.team_id, 'customer_id', e.customer_id)) as s
where s.max_budget is not null or s.budget_duration is not null
order by e.i, s.ord
"""


@dataclass(frozen=True)
class Planned:
    """One request to record, before its budget periods are known."""

    call_id: str
    key: SeedKey
    customer: str
    model: int
    started_at: datetime
    seconds: float
    usage: TokenUsage
    failed: bool


def plan_requests(customers: int, events: int, keys: Sequence[SeedKey], rng: random.Random) -> list[Planned]:
    """`events` requests over the last DAYS days in time order, skewed over the customers."""
    ranked = list(range(customers))
    rng.shuffle(ranked)  # the biggest customers are not the first ids
    weights = [1 / (rank + 1) ** ZIPF for rank in range(customers)]
    chosen = rng.choices(ranked, weights, k=events)
    model_weights = [m[5] for m in MODELS]
    now = datetime.now(UTC)
    start = now - timedelta(days=DAYS)
    offsets = sorted(rng.random() * (DAYS * 86400 - 120) for _ in range(events))
    # Each customer calls through one or two keys (its integration's), not all of them.
    planned = []
    for n, (index, offset) in enumerate(zip(chosen, offsets, strict=True)):
        key = keys[(index + (n % 2) * 7) % len(keys)] if index % 3 == 0 else keys[index % len(keys)]
        input_tokens = int(rng.lognormvariate(6.0, 1.0)) + 5
        output_tokens = int(rng.lognormvariate(5.0, 0.8)) + 1
        cached = input_tokens // 2 if rng.random() < 0.2 else 0
        failed = rng.random() < FAILURES
        usage = TokenUsage() if failed else TokenUsage.reported(input_tokens, output_tokens, cache_read=cached)
        planned.append(Planned(
            call_id=f"chatcmpl-{uuid.UUID(int=rng.getrandbits(128)).hex}", key=key,
            customer=customer_id(index, customers), model=rng.choices(range(len(MODELS)), model_weights)[0],
            started_at=start + timedelta(seconds=offset), seconds=0.2 + rng.random() * 4,
            usage=usage, failed=failed,
        ))  # fmt: skip
    return planned


class UsageSeeder:
    """Builds each request's UsageRecorded as the proxy does and records batches as its settle does."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._prices = PriceBook(settings.deployments)
        self._deployments = {d.model_name: d for d in settings.deployments}
        # What the server's settles write to the outbox and take from the config (api/publishing.py);
        # no NOTIFY: the publisher is not running yet.
        self._outbox: OutboxRows = outbox_rows_builder(settings)
        self.context: RecordingContext = msgspec.structs.replace(recording_context(settings), notify=False)

    async def record(self, conn: asyncpg.Connection, batch: Sequence[Planned]) -> None:
        rows = await conn.fetch(
            _PERIODS,
            [p.key.key_hash for p in batch],
            [p.key.user_id for p in batch],
            [p.key.team_id for p in batch],
            [p.customer for p in batch],
            [p.started_at for p in batch],
        )
        periods: dict[int, list[tuple[str, str, str]]] = {}
        for row in rows:
            periods.setdefault(row["i"] - 1, []).append((row["scope"], row["scope_id"], row["period"].isoformat()))
        recordings = []
        for i, p in enumerate(batch):
            name = MODELS[p.model][0]
            deployment = self._deployments[name]
            price = self._prices.price(deployment.deployment_id)
            cost = charge(price, p.usage)
            worst = charge(price, TokenUsage.reported(p.usage.input_tokens + 200, 4096))
            tokens: dict[str, Any] = p.usage.counts()  # the totals and their parts, as the proxy names them
            event = Usage(
                call_id=p.call_id, route="chat.completions", model_group=name,
                deployment_id=deployment.deployment_id, provider=deployment.provider,
                upstream_model=deployment.upstream_model, key_hash=p.key.key_hash, key_alias=p.key.alias,
                user_id=p.key.user_id, team_id=p.key.team_id, customer_id=p.customer,
                status="failure" if p.failed else "success", http_status=502 if p.failed else 200,
                error_type="upstream_error" if p.failed else None, stream=i % 4 == 0,
                **tokens, input_cost_per_token=cost.input_cost_per_token,
                output_cost_per_token=cost.output_cost_per_token, unit_prices=cost.unit_prices,
                costs=cost.costs, unpriced_kinds=cost.unpriced_kinds, cost=cost.total, priced=cost.priced,
                started_at=p.started_at, ended_at=p.started_at + timedelta(seconds=p.seconds),
                budget_periods=tuple(periods.get(i, ())), hold=worst.total,
            )  # fmt: skip
            recordings.append(Recording(event=event, outbox=self._outbox(event)))
        await record_usages(conn, recordings, self.context)


async def record_planned(url: str, seeder: UsageSeeder, planned: Sequence[Planned], advance: Step) -> None:
    """Record `planned` in batches of USAGE_BATCH, in order, on USAGE_CONNECTIONS connections: one
    builds its next batch's events while the other's settle runs in PostgreSQL (as the proxy's
    processes settle side by side; the settles lock shared rows in one global order)."""
    batches: asyncio.Queue[Sequence[Planned]] = asyncio.Queue()
    for lo in range(0, len(planned), USAGE_BATCH):
        batches.put_nowait(planned[lo : lo + USAGE_BATCH])

    async def worker() -> None:
        conn = await asyncpg.connect(url)
        try:
            while not batches.empty():
                batch = batches.get_nowait()
                await seeder.record(conn, batch)
                advance(len(batch))
        finally:
            await conn.close()

    await asyncio.gather(*(worker() for _ in range(USAGE_CONNECTIONS)))


async def seed(
    url: str, settings: Settings, customers: int, events: int, seed_value: int = 20,
    console: Console | None = None,
) -> Seeded:  # fmt: skip
    """Seed a migrated database; what was made and how long each part took."""
    rng = random.Random(seed_value)
    seeded = Seeded()
    with _progress(console) as progress:
        task = progress.add_task("directory (tiers, teams, users, keys, customers)", total=customers)
        started_at = time.perf_counter()
        keys, counts = await seed_directory(url, customers, rng, _advance(progress, task))
        seeded.directory_s = time.perf_counter() - started_at
        seeded.customers, seeded.budgets, seeded.teams = counts["customers"], counts["budgets"], counts["teams"]
        seeded.users, seeded.keys = counts["users"], counts["keys"]

        task = progress.add_task("usage events (sl_record_usages)", total=events)
        started_at = time.perf_counter()
        planned = plan_requests(customers, events, keys, rng)
        await record_planned(url, UsageSeeder(settings), planned, _advance(progress, task))
        seeded.usage_s = time.perf_counter() - started_at
        seeded.events = len(planned)
        seeded.events_by_customer = Counter(p.customer for p in planned)

        task = progress.add_task("daily spend follower (catch_up)", total=events)
        started_at = time.perf_counter()
        conn = await asyncpg.connect(url)
        try:
            while (n := await follow_once(conn)) > 0:
                progress.advance(task, n)
            progress.update(task, completed=events)
            seeded.daily_s = time.perf_counter() - started_at
            task = progress.add_task("vacuum analyze", total=1)
            started_at = time.perf_counter()
            await conn.execute("vacuum analyze")
            progress.advance(task, 1)
            seeded.analyze_s = time.perf_counter() - started_at
        finally:
            await conn.close()
    if seeded.events_by_customer:
        ranked = seeded.events_by_customer.most_common()
        seeded.biggest, seeded.smallest = ranked[0], ranked[-1]
    return seeded


def _advance(progress: Progress, task: TaskID) -> Step:
    return lambda n: progress.advance(task, n)


@contextlib.contextmanager
def _progress(console: Console | None) -> Iterator[Progress]:
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, disable=console is None,
    )  # fmt: skip
    with progress:
        yield progress


# --- signing in and timing the pages ------------------------------------------------------------

_CSRF: Final = re.compile(r"<input[^>]*\bname=\"csrf_token\"[^>]*>", re.S)
_VALUE: Final = re.compile(r"\bvalue=\"([^\"]*)\"")


@dataclass
class PageResult:
    name: str
    path: str
    times_ms: list[float] = field(default_factory=list)
    status: int | None = None
    failure: str | None = None  # the status and the start of the body of an answer that was not 200
    size: int = 0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.times_ms)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _cookie(response: httpx.Response, name: str) -> str | None:
    for header in response.headers.get_list("set-cookie"):
        found = re.match(rf"\s*{re.escape(name)}=([^;]*)", header)
        if found and found[1]:
            return found[1]
    return None


def _short(response: httpx.Response) -> str:
    body = response.text[:BODY_SHOWN].replace("\n", " ").replace("|", "\\|")
    location = response.headers.get("location")
    return f"{response.status_code}{f' → {location}' if location else ''}: {body}"


def sign_in(client: httpx.Client, master_key: str) -> tuple[str | None, str]:
    """The session cookie's value (None if signing in failed) and what happened."""
    form = client.get("/ui/login")
    if form.status_code != 200:
        return None, f"GET /ui/login answered {_short(form)}"
    tag = _CSRF.search(form.text)
    token = _VALUE.search(tag[0]) if tag else None
    login = _cookie(form, "spendledger_ui_login")
    if token is None or login is None:
        return None, f"GET /ui/login: no csrf_token input or no login cookie: {_short(form)}"
    answer = client.post(
        "/ui/login", data={"csrf_token": token[1], "api_key": master_key},
        headers={"Cookie": f"spendledger_ui_login={login}"},
    )  # fmt: skip
    session = _cookie(answer, "spendledger_ui")
    if answer.status_code != 303 or session is None:
        return None, f"POST /ui/login answered {_short(answer)}"
    return session, "signed in"


def measure(base_url: str, master_key: str, pages: Sequence[tuple[str, str]], rounds: int) -> tuple[list[PageResult], str]:
    """Each page WARM_UPS times, then `rounds` times, the pages in turn on one keep-alive connection."""
    results = [PageResult(name, path) for name, path in pages]
    with httpx.Client(base_url=base_url, timeout=60, follow_redirects=False) as client:
        session, signed = sign_in(client, master_key)
        client.cookies.clear()
        headers = {"Cookie": f"spendledger_ui={session}"} if session else {}
        for n in range(WARM_UPS + rounds):
            for result in results:
                if result.failure is not None:
                    continue
                started_at = time.perf_counter()
                response = client.get(result.path, headers=headers)
                elapsed = (time.perf_counter() - started_at) * 1000
                client.cookies.clear()
                result.status = response.status_code
                if response.status_code != 200:
                    result.failure = _short(response)
                    continue
                result.size = len(response.content)
                if n >= WARM_UPS:
                    result.times_ms.append(elapsed)
    return results, signed


def pages_to_time(seeded: Seeded, customers: int, middle: str, today: date) -> list[tuple[str, str]]:
    start = today - timedelta(days=DAYS)
    return [
        ("budgets", "/ui/budgets"),
        ("customers", "/ui/customers"),
        (f"customers, search `{search_text(customers)}`", f"/ui/customers?q={search_text(customers)}"),
        ("customers, from the middle", f"/ui/customers?after={middle}"),
        (f"customer, the biggest ({seeded.biggest[1]:,} requests)", f"/ui/customer?id={seeded.biggest[0]}"),
        (f"customer, a small one ({seeded.smallest[1]:,} request{'s' if seeded.smallest[1] != 1 else ''})", f"/ui/customer?id={seeded.smallest[0]}"),
        ("keys", "/ui/keys"),
        ("teams", "/ui/teams"),
        ("users", "/ui/users"),
        ("spend (default range)", "/ui/spend"),
        (f"spend, {DAYS} days", f"/ui/spend?start={start.isoformat()}&end={today.isoformat()}"),
        ("delivery", "/ui/delivery"),
    ]


def table(results: Sequence[PageResult]) -> str:
    lines = ["| page | path | p50 ms | p95 ms | max ms | status |", "|---|---|---|---|---|---|"]
    for r in results:
        if r.failure is not None or not r.times_ms:
            lines.append(f"| {r.name} | `{r.path}` | – | – | – | {r.failure or r.status} |")
            continue
        verdict = "200" if r.percentile(0.95) < TARGET_MS else f"200, **p95 over {TARGET_MS:.0f} ms**"
        lines.append(
            f"| {r.name} | `{r.path}` | {statistics.median(r.times_ms):.1f} | {r.percentile(0.95):.1f} | "
            f"{max(r.times_ms):.1f} | {verdict} |"
        )
    return "\n".join(lines)


# --- the run ------------------------------------------------------------------------------------


async def _facts(url: str, customers: int) -> dict[str, object]:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("vacuum analyze")
        q = search_text(customers)
        return {
            "pg_version": await conn.fetchval("show server_version"),
            "events": await conn.fetchval("select count(*) from events"),
            "usage": await conn.fetchval("select count(*) from events where type = 'UsageRecorded'"),
            "customers": await conn.fetchval("select count(*) from customers"),
            "budgets": await conn.fetchval("select count(*) from budgets"),
            "daily_rows": await conn.fetchval("select count(*) from daily_spend"),
            "budget_usage_rows": await conn.fetchval("select count(*) from budget_usage"),
            "outbox": {r["state"]: r["n"] for r in await conn.fetch("select state, count(*) as n from outbox group by 1")},
            "matching": await conn.fetchval(
                "select count(*) from customers where strpos(user_id, $1) > 0 or strpos(coalesce(alias, ''), $1) > 0", q
            ),
            "middle": await conn.fetchval(
                "select user_id from customers order by user_id offset $1 limit 1", customers // 2
            ),
            "db_size": await conn.fetchval("select pg_size_pretty(pg_database_size(current_database()))"),
        }
    finally:
        await conn.close()


async def _wait_delivered(url: str, timeout_s: float) -> tuple[int, float]:
    """Wait until the publisher has delivered the seeded Lago rows; (rows pending, seconds waited)."""
    conn = await asyncpg.connect(url)
    started_at = time.monotonic()
    try:
        while True:
            pending = int(await conn.fetchval("select count(*) from outbox where state = 'pending'"))
            if pending == 0 or time.monotonic() - started_at > timeout_s:
                return pending, time.monotonic() - started_at
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


def run(args: argparse.Namespace, console: Console) -> None:
    master_key = "sk-" + secrets.token_urlsafe(24)  # this run's own: never a publicly known key
    workdir = Path(tempfile.mkdtemp(prefix="sl-bench-ui-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        database = EmbeddedDatabase(workdir / "pg")
    try:
        with contextlib.ExitStack() as stack:
            sinks: Service = stack.enter_context(fake("sinks", workdir))
            config = workdir / "spendledger.yaml"
            config.write_text(config_text(master_key))
            settings = load_settings(config, lago_env(sinks.url))
            console.print(f"migrating {database.url.split('@')[-1]} …")
            run_migrations(database.url)
            seeded = asyncio.run(seed(database.url, settings, args.customers, args.events, console=console))
            console.print(
                f"seeded in {seeded.seconds:.1f} s: directory {seeded.directory_s:.1f} s, usage {seeded.usage_s:.1f} s "
                f"({seeded.events / max(seeded.usage_s, 1e-9):,.0f} events/s), daily spend {seeded.daily_s:.1f} s, "
                f"vacuum analyze {seeded.analyze_s:.1f} s"
            )

            port = free_port()
            env = {"DATABASE_URL": database.url, **lago_env(sinks.url)}
            argv = [sys.executable, "-m", "spendledger.api", "serve", "--config", str(config),
                    "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
            server = stack.enter_context(started(
                "spendledger", argv, workdir, f"http://127.0.0.1:{port}", "/health/readiness", env=env, timeout_s=120
            ))  # fmt: skip
            pending, waited = asyncio.run(_wait_delivered(database.url, 300))
            console.print(f"server up; Lago rows delivered by its publisher in {waited:.1f} s ({pending} pending)")
            facts = asyncio.run(_facts(database.url, args.customers))  # and vacuum analyze: no autovacuum during the timing
            console.print(facts)
            pages = pages_to_time(seeded, args.customers, str(facts["middle"]), datetime.now(UTC).date())
            postmaster = int(next(database.data_dir.rglob("postmaster.pid")).read_text().split()[0])
            meter = Meter({"server": server.process.pid, "postgres": postmaster, "sinks": sinks.process.pid})
            quiet_s = meter.wait_quiet(QUIET_CORES, 30)
            before = meter.sample()
            results, signed = measure(server.url, master_key, pages, args.rounds)
            cpu = Meter.cores(before, meter.sample())
            console.print(f"sign-in: {signed}")
            if any(r.status is not None and r.status >= 500 for r in results):
                console.rule("the server's log, its end (a page answered 5xx)")
                print(server.log(4000), flush=True)
    finally:
        database.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    body = report(args, seeded, facts, results, waited, Machine(cpu, quiet_s))
    print(body, flush=True)  # as it is: markdown, not wrapped to the terminal
    ok = all(r.failure is None and r.times_ms for r in results)
    if args.write:
        if not ok:
            console.print("[red]not written: not every page answered 200[/red]")
        else:
            write_section(SECTION, command(args), body, str(facts["pg_version"]))
            console.print(f"written: docs/benchmarks.md, ## {SECTION}")


def command(args: argparse.Namespace) -> str:
    return (
        f".venv/bin/python scripts/bench/ui_pages.py --customers {args.customers} --events {args.events} "
        f"--rounds {args.rounds}"
    )


@dataclass(frozen=True)
class Machine:
    cores: dict[str, float]  # by group of processes over the timing (Meter.cores)
    quiet_s: float  # waited for the rest of the machine to be quiet before it

    def text(self) -> str:
        c = self.cores
        return (
            f"CPU during the timing, in cores: the server (and its publisher child) {c['server']:.2f}, PostgreSQL "
            f"{c['postgres']:.2f}, this client {c['bench']:.2f}, the rest of the machine {c['others']:.2f} (waited "
            f"{self.quiet_s:.0f} s before it for the rest to use under {QUIET_CORES} cores)."
        )


def report(
    args: argparse.Namespace, seeded: Seeded, facts: dict[str, object], results: Sequence[PageResult], waited: float,
    machine: Machine,
) -> str:  # fmt: skip
    timed = [r for r in results if r.failure is None and r.times_ms]
    slowest = max(timed, key=lambda r: r.percentile(0.95), default=None)
    over = [r for r in timed if r.percentile(0.95) >= TARGET_MS]
    failed = [r for r in results if r.failure is not None or not r.times_ms]
    if failed:
        verdict = f"**not measured**: {len(failed)} of {len(results)} pages did not answer 200"
    elif over:
        verdict = f"**not met**: {len(over)} page(s) with a p95 of {TARGET_MS:.0f} ms or more"
    else:
        verdict = f"**met**: every page's p95 under {TARGET_MS:.0f} ms"
    outbox = facts["outbox"]
    assert isinstance(outbox, dict)
    lines = [
        f"One machine runs everything (2 cores): an embedded PostgreSQL {facts['pg_version']}, `spendledger serve "
        "--workers 1` (its publisher child and daily-spend follower running; Lago on the fake sinks of "
        "scripts/bench/fake_upstream.py) and the client (httpx, one keep-alive connection, signed in as a "
        "browser is: the sign-in form's CSRF token and cookie, then the session cookie).",
        "",
        f"Seeded through the ledger's write path in {seeded.seconds:.0f} s: {seeded.budgets:,} budgets "
        f"({len(TIERS)} tiers and the customers' own), {seeded.teams} teams, {seeded.users} internal users, "
        f"{seeded.keys} keys and {seeded.customers:,} customers by the directory's commands "
        f"({seeded.directory_s:.1f} s, in transactions of {DIRECTORY_BATCH} on {DIRECTORY_CONNECTIONS} connections); "
        f"{seeded.events:,} UsageRecorded over the last {DAYS} days, {len(MODELS)} model groups, Zipf over the "
        f"customers ({len(seeded.events_by_customer):,} of them with usage, the biggest {seeded.biggest[1]:,} events), "
        f"recorded by `sl_record_usages` in batches of {USAGE_BATCH:,} on {USAGE_CONNECTIONS} connections, with the "
        "budget periods admission gives and "
        f"their Lago rows ({seeded.usage_s:.1f} s, {seeded.events / max(seeded.usage_s, 1e-9):,.0f} events/s); "
        f"the daily spend follower caught up ({seeded.daily_s:.1f} s), then `vacuum analyze` ({seeded.analyze_s:.1f} s). "
        f"Database {facts['db_size']}: {facts['events']:,} events, {facts['daily_rows']:,} daily_spend rows, "
        f"{facts['budget_usage_rows']:,} budget_usage rows, outbox "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(outbox.items()))
        + f" (the server's publisher delivered the seeded Lago rows in {waited:.0f} s; then `vacuum analyze` "
        "again, so that no autovacuum of the delivered rows runs during the timing).",
        "",
        f"Each page {WARM_UPS} times to warm up, then {args.rounds} times, the pages in turn; the time is the "
        "client's, from sending the request to the last byte of the body.",
        "",
        table(results),
        "",
        f"- The search `{search_text(args.customers)}` matches {facts['matching']:,} customers "
        f"({100 * int(str(facts['matching'])) / max(args.customers, 1):.1f}%); `after` names the middle customer "
        f"({args.customers // 2:,} ids before it).",
        "- " + machine.text(),
        "",
        f"Requirement, each page in under {TARGET_MS:.0f} ms: {verdict}"
        + (
            f"; the slowest, {slowest.name}: p50 {statistics.median(slowest.times_ms):.1f}, "
            f"p95 {slowest.percentile(0.95):.1f}, max {max(slowest.times_ms):.1f} ms."
            if slowest
            else "."
        ),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--write", action="store_true", help=f"replace '## {SECTION}' in docs/benchmarks.md")
    args = parser.parse_args()
    run(args, Console())


if __name__ == "__main__":
    main()
