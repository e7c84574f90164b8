"""ledger/events.py is the checked vocabulary of the SQL: every read of an event's field in
ledger/sql/*.sql and in the SQL of projections/*.py (`d->>'customer_id'`, `e.data->'cost'`,
`d #>> '{budget_periods}'`, `d ? 'hold'`) names a field of the event type that value holds.

Which JSON value holds which event is declared below, per SQL function and per projections module
constant or function (in the settle `d` is a UsageRecorded; the audit filters read `data` of every
event type; the alias lookup reads only KeyGenerated and KeyUpdated). Every other JSON value the
SQL reads is named in NOT_EVENTS with what it holds, so a read of an unknown value fails the scan
until someone says what it is. A field named by a parameter (`e.data->>$1`) is listed in DYNAMIC
with the Python mapping that supplies it, and that mapping is checked instead. Entries that no
longer match anything fail too, so the lists stay true.

No database: the text is scanned. Table columns are never flagged — only JSON operators are read.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, get_args

import msgspec

from spendledger.ledger.events import AnyEvent, Event
from spendledger.ledger.outbox import OutboxRow
from spendledger.ledger.sql import function_definitions
from spendledger.ledger.usage import RecordingContext
from spendledger.projections.reconciliation import BY_FIELD, CHARGE_BY_FIELD

PROJECT_ROOT: Final = Path(__file__).resolve().parents[3]
EVENTS: Final[dict[str, type[Event]]] = {cls.__name__: cls for cls in get_args(AnyEvent)}
USAGE: Final = ("UsageRecorded",)
EVERY_EVENT: Final = tuple(EVENTS)

# --- what each value holds ------------------------------------------------------------------------

# SQL function → JSON value → the event types it holds.
SQL_EVENT_VALUES: Final[dict[str, dict[str, tuple[str, ...]]]] = {
    "sl_usage_scopes": {"d": USAGE},
    "sl_usage_periods": {"d": USAGE},
    "sl_usage_value_keys": {"d": USAGE},
    "sl_spend_log_row": {"d": USAGE},
    "sl_record_usage": {"d": USAGE},  # the event it appends
    "sl_record_usages": {"d": USAGE, "e.d": USAGE},  # the elements of `ds`, the events it appends
    "sl_project_usage": {"d": USAGE},  # the elements of `ds`
    "sl_draw_leases": {"e.d": USAGE},
    "sl_daily_rows": {"d": USAGE},
    "sl_webhook_scopes": {"d": USAGE},
    "sl_key_spends": {"e.d": USAGE},
    "sl_webhook_rows": {"e.d": USAGE, "req.d": USAGE, "w.d": USAGE},
    "sl_webhook_run": {"d": USAGE},
    # A usage event, or the refusal's context ledger/admission.py builds under UsageRecorded's names.
    "sl_enqueue_webhook": {"d": USAGE},
}

# projections/<module>.py:<top-level name> → JSON value → the event types it holds.
PROJECTION_EVENT_VALUES: Final[dict[str, dict[str, tuple[str, ...]]]] = {
    "audit.py:_entity_tests": {"data": EVERY_EVENT},  # the audit's filters read events of every type
    "audit.py:_build": {"data": EVERY_EVENT},
    "audit.py:key_hash_for_alias": {"data": ("KeyGenerated", "KeyUpdated")},  # `type = any(…)`
    "lago_reconcile.py:_RECONCILE_SQL": {"e.data": USAGE},  # `where type = 'UsageRecorded'`
    "reconciliation.py:_usage_in_range": {"e.data": USAGE},
    "reconciliation.py:_ROWS_SQL": {"e.data": USAGE},  # where _usage_in_range(…)
    "reconciliation.py:_SUMMARY_SQL": {"e.data": USAGE},
    "reconciliation.py:_PARTS_READ": {"e.data": USAGE},  # inside _ROWS_SQL
    "reconciliation.py:_PARTS_TOTALLED": {"e.data": USAGE},  # inside _SUMMARY_SQL
    # the call ids Lago rejected, joined to the usage (inside _ROWS_SQL and _SUMMARY_SQL)
    "reconciliation.py:_REJECTED": {"data": ("LagoEventRejected",), "e.data": USAGE},
    "lago_against.py:_USAGE": {"data": USAGE},
    "lago_against.py:_REJECTED": {"data": ("LagoEventRejected",)},
    "admin_views.py:_RECENT": {"e.data": USAGE},  # `e.type = 'UsageRecorded'`
}

# Every other JSON value read, with what it holds. A set of names is checked like an event's
# fields; None is not checked here (free-form, or a vocabulary with no Struct of its own).
NOT_EVENTS: Final[dict[str, tuple[str, frozenset[str] | None]]] = {
    "ctx": ("a settle's RecordingContext (ledger/usage.py), `as_of` added by the follower",
            frozenset({*RecordingContext.__struct_fields__, "as_of"})),
    "o": ("an outbox row to enqueue (ledger/outbox.py)", frozenset(OutboxRow.__struct_fields__)),
    "p": ("an admission's or lease's parameters (ledger/admission.py params_of, ledger/leases.py), or the "
          "scopes and budget settings sl_request_scopes reads", None),
    "p0": ("the first of a batch's admission parameters", None),
    "ps": ("a batch of admission parameters: an array", None),
    "refusal": ("the refusal sl_admit builds: RequestRefused.detail, free-form", None),
    "meta": ("an event's metadata (actor, lease, webhooks), not its data", None),
    "metas": ("the metadata of a batch's events: an array", None),
    "metadata": ("the events table's metadata column", None),
    "e.metadata": ("the events table's metadata column", None),
    "outboxes": ("a batch's outbox rows: an array per event", None),
    "released": ("released holds by call id", None),
    "r": ("an element of budget_periods, budget_rows, tpm_rows or parallel_rows: [scope, id, period]", None),
    "vals": ("the settle's values by value key (sl_usage_value_keys)", None),
    "totals": ("lifetime totals by value key once a run is counted (sl_project_usage, sl_key_spends)", None),
    "h.value": ("a released hold or lease share, by call id (sl_project_usage's `released`)", None),
    "models": ("a scope's allowed models, a JSON array (`?`: is the model in it)", None),
    "req.request_values": ("a request's values by value key", None),
    "o.payload": ("a Lago event's payload (ledger/sinks), not a ledger event", None),
    "to_jsonb(old)": ("a directory table's row (the directory_history trigger): its columns", None),
    "cand": ("a routing candidate, [deployment_id, rpm, tpm] (sl_take_deployment)", None),
    "o.cand": ("a routing candidate, [deployment_id, rpm, tpm] (sl_take_deployment)", None),
}  # fmt: skip

# Reads whose field is a parameter: (source, value) → what supplies the names (checked below).
DYNAMIC: Final[dict[tuple[str, str], str]] = {
    ("reconciliation.py:_ROWS_SQL", "e.data"): "projections.reconciliation.BY_FIELD's values",
    ("lago_reconcile.py:_RECONCILE_SQL", "e.data"): "projections.reconciliation.CHARGE_BY_FIELD's values",
    ("lago_against.py:_USAGE", "data"): "projections.reconciliation.CHARGE_BY_FIELD's values",
}


def field_names(types: tuple[str, ...]) -> set[str]:
    """The JSON names of those events' fields, the `type` tag included."""
    names = {"type"}
    for name in types:
        names |= {f.encode_name for f in msgspec.structs.fields(EVENTS[name])}
    return names


# --- the scan -------------------------------------------------------------------------------------

_OPERATOR: Final = re.compile(r"->>|->|#>>|#>|\?(?![|&])")
_ARROW_BEFORE: Final = re.compile(r"(->>|->|#>>|#>)\s*$")
_NAME_BEFORE: Final = re.compile(r"[\w.]+$")  # a name, or an index (ps->0)
_KEY_AFTER: Final = re.compile(r"\s*('(?P<literal>[^']*)'|(?P<other>\$\d+|[\w.]+|\(|\[))?")


@dataclass(frozen=True)
class Read:
    source: str
    value: str  # the JSON value at the root of the path: `d`, `e.data`, `to_jsonb(old)`
    hop: int  # 1: a key of the value itself; 2: of what its first key holds …
    key: str | None  # the field named, when a literal names it
    text: str  # as written, for messages

    def __str__(self) -> str:
        return f"{self.source}: {self.text!r}"


def _matching_open(text: str, close: int, opening: str, closing: str) -> int:
    depth = 0
    for i in range(close, -1, -1):
        if text[i] == closing:
            depth += 1
        elif text[i] == opening:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {closing!r} in {text[max(0, close - 80) : close + 1]!r}")


def _root(text: str, end: int) -> tuple[str, int]:
    """The value a JSON operator starting at `end` reads, walking back over a path of operators
    (`d->'budget_periods'->0`), and how many hops from it the operator is."""
    hop = 1
    while True:
        before = text[:end].rstrip()
        if before.endswith(")") or before.endswith("]"):
            opening = _matching_open(before, len(before) - 1, *("()" if before[-1] == ")" else "[]"))
            head = before[:opening]
            arrow = _ARROW_BEFORE.search(head)
            if arrow and before[-1] == ")":  # metas->(i)->>'lease': a hop further on
                hop, end = hop + 1, arrow.start()
                continue
            name = _NAME_BEFORE.search(head)
            return (name.group() if name else "") + before[opening:], hop  # to_jsonb(old), s_models[k]
        if before.endswith("'"):
            opening = before.rfind("'", 0, len(before) - 1)
            arrow = _ARROW_BEFORE.search(before[:opening])
            if arrow is None:
                return before[opening:], hop  # a literal: no value of ours
            hop, end = hop + 1, arrow.start()
            continue
        name = _NAME_BEFORE.search(before)
        if name is None:
            return before[-20:], hop
        arrow = _ARROW_BEFORE.search(before[: name.start()])
        if arrow is not None:  # ps->i->>'x': an index, a hop further on
            hop, end = hop + 1, arrow.start()
            continue
        return name.group(), hop


def reads_in(source: str, text: str) -> Iterator[Read]:
    for found in _OPERATOR.finditer(text):
        value, hop = _root(text, found.start())
        key = _KEY_AFTER.match(text, found.end())
        assert key is not None
        literal = key.group("literal")
        if literal is not None and found.group().startswith("#"):  # a path: '{budget_periods,0}'
            literal = literal.strip("{}").split(",")[0].strip().strip('"') or None
        start = text.rfind("\n", 0, found.start()) + 1
        yield Read(
            source, value, hop, literal, text[start : text.find("\n", found.end()) % (len(text) + 1)].strip()
        )


def _without_comments(sql: str) -> str:
    """SQL with its `--` comments cut (outside quoted literals): prose may hold arrows and question marks."""
    lines = []
    for line in sql.splitlines():
        quoted = False
        for i, c in enumerate(line):
            if c == "'":
                quoted = not quoted
            elif not quoted and line.startswith("--", i):
                line = line[:i]
                break
        lines.append(line)
    return "\n".join(lines)


def sql_sources() -> dict[str, str]:
    return {name: _without_comments(text) for name, text in function_definitions().items()}


def projection_sources() -> dict[str, str]:
    """Each top-level function, class or constant of projections/*.py: its string literals (the
    literal parts of f-strings included; docstrings left out), one per line."""
    sources: dict[str, str] = {}
    for path in sorted((PROJECT_ROOT / "projections").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
        }  # fmt: skip
        for statement in tree.body:
            if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = statement.name
            elif isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Name):
                name = statement.targets[0].id
            elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                name = statement.target.id
            else:
                continue
            strings = [
                node.value for node in ast.walk(statement)
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            ]  # fmt: skip
            if any(_OPERATOR.search(s) for s in strings):
                sources[f"{path.name}:{name}"] = "\n".join(strings)
    return sources


@dataclass
class Findings:
    wrong: list[str]  # a field the event does not have
    unclassified: list[str]  # a value nobody said what it holds
    unused: list[str]  # declarations that match nothing


def scan(sources: Mapping[str, str], event_values: Mapping[str, Mapping[str, tuple[str, ...]]]) -> Findings:
    findings = Findings([], [], [])
    used: set[tuple[str, str]] = set()
    for source, text in sources.items():
        for read in reads_in(source, text):
            holds = event_values.get(source, {}).get(read.value)
            if holds is not None:
                used.add((source, read.value))
                if read.hop > 1:
                    continue  # inside a field already checked (d->'budget_periods'->0)
                if read.key is None:
                    if (source, read.value) not in DYNAMIC:
                        findings.unclassified.append(f"{read}: a field named by a parameter, not in DYNAMIC")
                    used.add((source, f"dynamic:{read.value}"))
                elif read.key not in field_names(holds):
                    findings.wrong.append(f"{read}: {read.key!r} is no field of {' | '.join(holds)}")
            elif read.value in NOT_EVENTS:
                used.add(("", read.value))
                vocabulary = NOT_EVENTS[read.value][1]
                if (
                    vocabulary is not None
                    and read.hop == 1
                    and read.key is not None
                    and read.key not in vocabulary
                ):
                    findings.wrong.append(f"{read}: {read.key!r} is not one of {sorted(vocabulary)}")
            else:
                findings.unclassified.append(f"{read}: what does {read.value!r} hold? (an event: declare it; "
                                             "else name it in NOT_EVENTS)")  # fmt: skip
    for source, values in event_values.items():
        if source in sources:
            findings.unused += [f"{source}: {v}" for v in values if (source, v) not in used]
    return findings


# --- the tests ------------------------------------------------------------------------------------


def test_every_event_field_the_sql_reads_is_a_field_of_its_event() -> None:
    found = scan(sql_sources(), SQL_EVENT_VALUES)
    assert found.wrong == []
    assert found.unclassified == []
    assert found.unused == []
    assert set(SQL_EVENT_VALUES) <= set(function_definitions()), (
        "declared for a function ledger/sql no longer has"
    )


def test_every_event_field_the_projections_read_is_a_field_of_its_event() -> None:
    sources = projection_sources()
    found = scan(sources, PROJECTION_EVENT_VALUES)
    assert found.wrong == []
    assert found.unclassified == []
    assert found.unused == []
    assert set(PROJECTION_EVENT_VALUES) <= set(sources), "declared for a name projections/ no longer has"
    assert {source for source, _ in DYNAMIC} <= set(sources)


def test_the_lists_name_what_the_code_reads() -> None:
    """Every NOT_EVENTS entry is read somewhere (a stale one would hide a new value of that name)."""
    read = {
        r.value
        for source, text in [*sql_sources().items(), *projection_sources().items()]
        for r in reads_in(source, text)
    }
    assert set(NOT_EVENTS) - read == set()


def test_fields_named_by_a_parameter_are_usage_fields() -> None:
    """The fields DYNAMIC's reads take from Python: the reports' grouping and Lago's charge-by id."""
    usage = field_names(USAGE)
    assert set(BY_FIELD.values()) <= usage
    assert set(CHARGE_BY_FIELD.values()) <= usage


def test_a_misspelt_field_fails_the_scan() -> None:
    sources = sql_sources()
    assert "d->>'customer_id'" in sources["sl_usage_scopes"]
    misspelt = {
        **sources,
        "sl_usage_scopes": sources["sl_usage_scopes"].replace("d->>'customer_id'", "d->>'custmer_id'"),
    }
    assert [w.split(": ", 1)[0] for w in scan(misspelt, SQL_EVENT_VALUES).wrong] == ["sl_usage_scopes"]
    for written in (
        "(e.d->>'custmer_id')",
        "coalesce(d->'budget_period', '[]')",
        "d #>> '{custmer_id}'",
        "d ? 'hld'",
    ):
        added = {**sources, "sl_webhook_run": sources["sl_webhook_run"] + f"\nselect {written};"}
        found = scan(added, {**SQL_EVENT_VALUES, "sl_webhook_run": {"d": USAGE, "e.d": USAGE}})
        assert len(found.wrong) == 1, (written, found)
    projections = projection_sources()
    typo = {
        **projections,
        "reconciliation.py:_ROWS_SQL": projections["reconciliation.py:_ROWS_SQL"].replace(
            "'input_tokens'", "'input_token'"
        ),
    }
    assert len(scan(typo, PROJECTION_EVENT_VALUES).wrong) == 1
    # a field of another event: RequestRefused has `reason`, a usage event has none
    refused = {**sources, "sl_daily_rows": sources["sl_daily_rows"] + "\nselect d->>'reason';"}
    assert len(scan(refused, SQL_EVENT_VALUES).wrong) == 1


def test_a_value_nobody_declared_fails_the_scan() -> None:
    sources = {
        **sql_sources(),
        "sl_new": "create or replace function sl_new(x jsonb) returns text as $$ select x->>'call_id' $$",
    }
    assert [u.split(":")[0] for u in scan(sources, SQL_EVENT_VALUES).unclassified] == ["sl_new"]


def test_the_scan_finds_the_value_at_the_root_of_a_path() -> None:
    found = {(r.value, r.hop, r.key) for r in reads_in("t", "metas->(e.i::integer - 1)->>'lease', d->'budget_periods'->0->>1, to_jsonb(old)->>tg_argv[0], s.v #>> '{}', (p->>'hold')::numeric, meta ? 'lease'")}  # fmt: skip
    assert found == {
        ("metas", 1, None), ("metas", 2, "lease"), ("d", 1, "budget_periods"), ("d", 2, None), ("d", 3, None),
        ("to_jsonb(old)", 1, None), ("s.v", 1, None), ("p", 1, "hold"), ("meta", 1, "lease"),
    }  # fmt: skip
