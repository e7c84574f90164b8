"""Budget periods on the calendar of `litellm_settings.timezone`, as LiteLLM resets them: the info
routes show `budget_reset_at` at the next midnight, Monday or 1st of the month in that zone."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest

from tests.e2e.conftest import MASTER_KEY, proxy_config
from tests.e2e.enforcement_support import query
from tests.fakes.upstream import RunningUpstream
from tests.support import PostgresForTests, RunningServer, run_server

ZONE = "Asia/Tokyo"  # nine hours ahead of UTC all year: its midnight is 15:00 UTC the day before
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}


@pytest.fixture(scope="module")
def tokyo(postgres: PostgresForTests, upstream: RunningUpstream) -> Iterator[RunningServer]:
    url = postgres.new_database()
    config = proxy_config(upstream.base_url) + f"litellm_settings:\n  timezone: {ZONE}\n"
    with run_server(config, url) as running:
        yield running
    postgres.drop_database(url)


def midnight_after(days: int) -> datetime:
    """Midnight in Tokyo, `days` days after today's there."""
    today = datetime.now(ZoneInfo(ZONE)).date()
    return local_midnight(today + timedelta(days=days))


def local_midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(ZONE)).astimezone(UTC)


def call(server: RunningServer, method: str, path: str, **kwargs: object) -> dict[str, object]:
    response = httpx.request(method, f"{server.base_url}{path}", headers=AUTH, timeout=30, **kwargs)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def reset_at(value: object) -> datetime:
    assert isinstance(value, str), value
    return datetime.fromisoformat(value)


def test_the_server_writes_its_zone_to_the_budget_calendar(tokyo: RunningServer) -> None:
    assert query(tokyo.database_url, "select timezone from budget_calendar")[0]["timezone"] == ZONE


def test_a_daily_customer_budget_resets_at_the_next_midnight_in_the_zone(tokyo: RunningServer) -> None:
    call(tokyo, "POST", "/customer/new", json={"user_id": "daily", "max_budget": 5, "budget_duration": "1d"})
    info = call(tokyo, "GET", "/customer/info", params={"end_user_id": "daily"})
    table = info["litellm_budget_table"]
    assert isinstance(table, dict)
    assert reset_at(table["budget_reset_at"]) == midnight_after(1)


def test_a_weekly_key_budget_resets_on_monday_and_a_monthly_team_budget_on_the_1st(tokyo: RunningServer) -> None:
    key = call(tokyo, "POST", "/key/generate", json={"max_budget": 5, "budget_duration": "7d"})
    today = datetime.now(ZoneInfo(ZONE)).date()
    monday = today + timedelta(days=7 - today.weekday())
    assert reset_at(key["budget_reset_at"]) == local_midnight(monday)
    info = call(tokyo, "GET", "/key/info", params={"key": key["key"]})
    assert isinstance(info["info"], dict) and reset_at(info["info"]["budget_reset_at"]) == local_midnight(monday)

    call(tokyo, "POST", "/team/new", json={"team_id": "monthly", "max_budget": 5, "budget_duration": "30d"})
    team = call(tokyo, "GET", "/team/info", params={"team_id": "monthly"})["team_info"]
    first = date(today.year + today.month // 12, today.month % 12 + 1, 1)
    assert isinstance(team, dict) and reset_at(team["budget_reset_at"]) == local_midnight(first)


def test_without_a_duration_there_is_no_reset(tokyo: RunningServer) -> None:
    key = call(tokyo, "POST", "/key/generate", json={"max_budget": 5})
    assert key["budget_reset_at"] is None
