"""Prometheus metrics: the ledger's and the outbox's, exposed at /metrics.

`spendledger serve` runs its workers and its publisher child in prometheus_client's multiprocess
mode (PROMETHEUS_MULTIPROC_DIR, set before any of them imports prometheus_client): each process
writes its samples to files there and one scrape of any worker sums them all (`latest`). The gauges
are the same database-derived value in every process: the most recent one set is shown.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from spendledger.ledger.events import UsageRecorded
from spendledger.ledger.outbox import WAITING, Claimed, Delivery
from spendledger.ledger.publisher_health import SinkReport

MULTIPROCESS_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

REQUESTS: Final = Counter(
    "spendledger_requests_total", "Proxied requests by route and outcome", ["route", "status"]
)
UNPRICED: Final = Counter(
    "spendledger_unpriced_requests_total", "Requests served for a model with no price", ["model"]
)
UNPRICED_KINDS: Final = Counter(
    "spendledger_unpriced_token_kinds_total",
    "Requests that used a kind of token (audio, image) with no price of its own, billed at the plain token's",
    ["model", "kind"],
)
ADMISSIONS: Final = Counter(
    "spendledger_admissions_total",
    "Admission decisions by how they were made: in memory from a budget lease, or by a round trip",
    ["path", "outcome"],
)
HOLDS_EXCEEDED: Final = Counter(
    "spendledger_holds_exceeded_total",
    "Requests that cost more than the worst case held for them (billed in full; a HoldExceeded event each)",
    ["model"],
)
OUTBOX_ROWS: Final = Gauge(
    "spendledger_outbox_rows",
    "Outbox rows waiting by sink and state (pending, dead, unbillable)",
    ["sink", "state"],
    multiprocess_mode="mostrecent",
)
OUTBOX_OLDEST_PENDING: Final = Gauge(
    "spendledger_outbox_oldest_pending_seconds", "Age of the oldest pending outbox row", ["sink"],
    multiprocess_mode="mostrecent",
)
OUTBOX_DELIVERED: Final = Counter("spendledger_outbox_delivered_total", "Outbox rows delivered", ["sink"])
OUTBOX_DEAD: Final = Counter(
    "spendledger_outbox_dead_letters_total", "Outbox rows set aside as dead letters", ["sink"]
)
OUTBOX_RETRIES: Final = Counter(
    "spendledger_outbox_retries_total", "Outbox deliveries to retry later", ["sink"]
)
OUTBOX_ROW_FAILURES: Final = Counter(
    "spendledger_outbox_row_failures_total",
    "Outbox rows that failed on their own (an exception building or sending the row, not the receiver's "
    "answer): retried with backoff, dead letters after ledger.outbox.MAX_OWN_FAILURES",
    ["sink", "error_type"],
)
SINK_UNAUTHORIZED: Final = Gauge(
    "spendledger_sink_unauthorized", "1 while a sink refuses our credentials (deliveries wait)", ["sink"],
    multiprocess_mode="mostrecent",
)
DELIVERY_LAG: Final = Histogram(
    "spendledger_outbox_delivery_lag_seconds",
    "From recording to acknowledged delivery",
    ["sink"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)


# LiteLLM's names (its prometheus callback), by model group: what its dashboards already read.
# The gateway's own time is the request's total less the provider's.
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 60, 120, 300)
OVERHEAD_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
REQUEST_LATENCY: Final = Histogram(
    "litellm_request_total_latency_metric", "A proxied request's time in the gateway, seconds (the provider's included)",
    ["model"], buckets=LATENCY_BUCKETS,
)  # fmt: skip
UPSTREAM_LATENCY: Final = Histogram(
    "litellm_llm_api_latency_metric", "The provider's time for a request, seconds (a stream: until its last byte)",
    ["model"], buckets=LATENCY_BUCKETS,
)  # fmt: skip
OVERHEAD_LATENCY: Final = Histogram(
    "litellm_overhead_latency_metric", "The gateway's own time for a request, seconds: its total less the provider's",
    ["model"], buckets=OVERHEAD_BUCKETS,
)  # fmt: skip
SPEND: Final = Counter("litellm_spend_metric", "Spend by model group, USD (the ledger has it exactly)", ["model"])
INPUT_TOKENS: Final = Counter("litellm_input_tokens_metric", "Input (prompt) tokens by model group", ["model"])
OUTPUT_TOKENS: Final = Counter("litellm_output_tokens_metric", "Output (completion) tokens by model group", ["model"])
TOTAL_TOKENS: Final = Counter("litellm_total_tokens_metric", "Input and output tokens by model group", ["model"])


def sample(amount: Decimal) -> float:
    """Money as a Prometheus sample, which is a float64: the metric is approximate by nature; the
    ledger, the API and the exports keep the exact amount."""
    return float(amount)


def latest() -> bytes:
    """The exposition: every process's samples in multiprocess mode, else this process's."""
    if os.environ.get(MULTIPROCESS_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()


def observe_admission(under_lease: bool, admitted: bool) -> None:
    ADMISSIONS.labels("lease" if under_lease else "database", "admitted" if admitted else "refused").inc()


def observe_request(
    route: str, status: str, model: str, priced: bool, unpriced_kinds: Sequence[str] = ()
) -> None:
    """A request's terminal event: `status` is its UsageRecorded status, or "refused"."""
    REQUESTS.labels(route, status).inc()
    if not priced:
        UNPRICED.labels(model).inc()
    for kind in unpriced_kinds:
        UNPRICED_KINDS.labels(model, kind).inc()


class _ModelSeries(msgspec.Struct, frozen=True):
    """One model group's children of the per-model metrics, looked up once (`labels()` takes a lock
    and builds a key on every call)."""

    spend: Any
    input_tokens: Any
    output_tokens: Any
    total_tokens: Any
    latency: Any
    upstream: Any
    overhead: Any


_series: dict[str, _ModelSeries] = {}


def _model_series(model: str) -> _ModelSeries:
    found = _series.get(model)
    if found is None:
        found = _series[model] = _ModelSeries(
            SPEND.labels(model), INPUT_TOKENS.labels(model), OUTPUT_TOKENS.labels(model),
            TOTAL_TOKENS.labels(model), REQUEST_LATENCY.labels(model), UPSTREAM_LATENCY.labels(model),
            OVERHEAD_LATENCY.labels(model),
        )  # fmt: skip
    return found


def observe_usage(event: UsageRecorded, total_s: float, upstream_s: float) -> None:
    """A recorded request: its terminal event, what it used and cost, and where its time went."""
    observe_request(event.route, event.status, event.model_group, event.priced, event.unpriced_kinds)
    series = _model_series(event.model_group)
    series.spend.inc(sample(event.cost))
    series.input_tokens.inc(event.input_tokens)
    series.output_tokens.inc(event.output_tokens)
    series.total_tokens.inc(event.total_tokens)
    series.latency.observe(total_s)
    series.upstream.observe(upstream_s)
    series.overhead.observe(max(0.0, total_s - upstream_s))


def observe_hold_exceeded(model: str) -> None:
    HOLDS_EXCEEDED.labels(model).inc()


def observe_delivery(sink: str, rows: Sequence[Claimed], delivery: Delivery) -> None:
    now = datetime.now(UTC)
    created = {row.id: row.created_at for row in rows}
    for row_id in delivery.delivered:
        DELIVERY_LAG.labels(sink).observe((now - created[row_id]).total_seconds())
    OUTBOX_DELIVERED.labels(sink).inc(len(delivery.delivered))
    OUTBOX_DEAD.labels(sink).inc(len(delivery.dead))
    OUTBOX_RETRIES.labels(sink).inc(len(delivery.retry))
    for error_type in delivery.failed.values():
        OUTBOX_ROW_FAILURES.labels(sink, error_type).inc()


def observe_sink_reports(reports: Mapping[str, SinkReport]) -> None:
    """From the publisher's reported health, so that a serving process shows what its publisher
    child (or a `spendledger publish` elsewhere) reports."""
    for sink, report in reports.items():
        SINK_UNAUTHORIZED.labels(sink).set(1 if report.state == "unauthorized" else 0)


def observe_status(status: dict[str, Any]) -> None:
    for sink, counts in status["sinks"].items():
        for state in WAITING:
            OUTBOX_ROWS.labels(sink, state).set(counts.get(state, 0))
        OUTBOX_OLDEST_PENDING.labels(sink).set(counts.get("oldest_pending_age_s", 0))
