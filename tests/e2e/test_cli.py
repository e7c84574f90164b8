"""`spendledger serve | migrate` as a user runs them: bad configs stop it with one clear line."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.e2e.conftest import MASTER_KEY, proxy_config
from tests.fakes.upstream import RunningUpstream
from tests.support import PROJECT_ROOT, PostgresForTests, run_server, with_database

# Nothing may be listening here: a config wrongly accepted fails on the database, not silently.
UNREACHABLE_DATABASE = "postgresql://nobody@127.0.0.1:9/nothing"

GOOD_MODEL = """
  - model_name: good
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: http://127.0.0.1:9/v1
"""

BAD_CONFIGS = {
    "invalid-yaml": (
        "model_list:\n  - model_name: x\n    litellm_params: {model: openai/x\n  oops: [\n",
        ["YAML"],
    ),
    "tab-indented-yaml": ("model_list:\n\t- model_name: x\n", ["YAML"]),
    "empty-model-list": ("model_list: []\ngeneral_settings:\n  master_key: sk-1\n", ["model_list"]),
    "no-model-list": ("general_settings:\n  master_key: sk-1\n", ["model_list"]),
    "empty-file": ("", ["model_list"]),
    "top-level-list": ("- model_name: x\n", ["model_list"]),
    "model-without-litellm-params-model": (
        "model_list:\n  - model_name: nameless\n    litellm_params:\n      api_base: http://127.0.0.1:9/v1\n",
        ["litellm_params.model", "nameless"],
    ),
    "model-without-litellm-params": ("model_list:\n  - model_name: bare\n", ["litellm_params", "bare"]),
    "unsupported-provider": (
        "model_list:\n  - model_name: claude\n    litellm_params:\n      model: bedrock/anthropic.claude\n",
        ["bedrock", "claude"],
    ),
    "azure-without-api-version": (
        "model_list:\n  - model_name: azure-gpt-3.5\n    litellm_params:\n      model: azure/gpt-35-turbo\n"
        "      api_base: https://res.openai.azure.com\n      api_key: k\n",
        ["azure-gpt-3.5", "api_version"],
    ),
    "negative-price": (
        "model_list:" + GOOD_MODEL + "    model_info:\n      input_cost_per_token: -0.0000015\n",
        ["input_cost_per_token", "negative"],
    ),
    "negative-output-price-in-litellm-params": (
        "model_list:"
        + GOOD_MODEL.replace("api_base", "output_cost_per_token: -1\n      api_base")
        + "general_settings:\n  master_key: sk-1\n",
        ["output_cost_per_token"],
    ),
    "price-not-a-number": (
        "model_list:" + GOOD_MODEL + "    model_info:\n      input_cost_per_token: cheap\n",
        ["input_cost_per_token"],
    ),
    "bad-max-request-size": (
        "model_list:" + GOOD_MODEL + "general_settings:\n  max_request_size_mb: -1\n",
        ["max_request_size_mb"],
    ),
}


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spendledger.api", *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, "DATABASE_URL": UNREACHABLE_DATABASE, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str], names: list[str]) -> str:
    assert result.returncode != 0, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    (line,) = lines
    for name in names:
        assert name in line, (name, line)
    return line


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_serve_refuses_a_bad_config_with_one_line(tmp_path: Path, case: str) -> None:
    text, names = BAD_CONFIGS[case]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    started = time.monotonic()
    result = run_cli("serve", "--config", str(path), "--port", "9")
    assert time.monotonic() - started < 10
    line = assert_one_line_failure(result, names)
    assert str(path) in line  # says which file


def test_serve_refuses_a_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "config.yaml"
    result = run_cli("serve", "--config", str(missing))
    line = assert_one_line_failure(result, [str(missing)])
    assert "No such file" in line or "not found" in line.lower() or "cannot read" in line


def test_serve_refuses_a_directory_as_config(tmp_path: Path) -> None:
    result = run_cli("serve", "--config", str(tmp_path))
    assert_one_line_failure(result, [str(tmp_path)])


def test_serve_without_config_argument_is_a_usage_error() -> None:
    result = run_cli("serve")
    assert result.returncode == 2
    assert "--config" in result.stderr and "Traceback" not in result.stderr


def test_migrate_refuses_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("model_list: []\n")
    assert_one_line_failure(run_cli("migrate", "--config", str(path)), ["model_list"])


def test_unknown_keys_start_with_one_warning_naming_them(
    postgres: PostgresForTests, upstream: RunningUpstream
) -> None:
    config = proxy_config(upstream.base_url, extra="  mystery_general_setting: 1").replace(
        "model_list:",
        "top_level_typo: true\nlitellm_settings:\n  mystery_litellm_setting: yes\nmodel_list:",
        1,
    )
    config = config.replace(
        "      api_key: upstream-secret-key\n",
        "      api_key: upstream-secret-key\n      weird_param: 1\n",
        1,
    )
    url = postgres.new_database()
    try:
        with run_server(config, url) as server:
            response = httpx.post(
                f"{server.base_url}/chat/completions",
                headers={"Authorization": f"Bearer {MASTER_KEY}"},
                json={"model": "fake-openai-endpoint", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert response.status_code == 200, response.text
            log = server.log()
    finally:
        postgres.drop_database(url)
    names = ("top_level_typo", "mystery_litellm_setting", "mystery_general_setting", "weird_param")
    mentioning = [line for line in log.splitlines() if any(name in line for name in names)]
    assert len(mentioning) == 1, log
    (line,) = mentioning
    for name in names:
        assert name in line, line
    record = json.loads(line)
    assert record["level"] == "warning", record
    assert "Traceback" not in log


def _revision(url: str) -> str | None:
    async def run() -> str | None:
        conn = await asyncpg.connect(url)
        try:
            value = await conn.fetchval("select version_num from alembic_version")
            return None if value is None else str(value)
        finally:
            await conn.close()

    return asyncio.run(run())


def test_migrate_exits_zero_and_is_idempotent(postgres: PostgresForTests) -> None:
    url = postgres.new_database()  # already migrated from the template: migrate must be a no-op
    try:
        head = _revision(url)
        assert head is not None
        for _ in range(2):
            result = run_cli("migrate", env={"DATABASE_URL": url}, timeout=60)
            assert result.returncode == 0, result.stderr
            assert "Traceback" not in result.stderr
            assert _revision(url) == head
    finally:
        postgres.drop_database(url)


def test_migrate_uses_the_config_database_url(postgres: PostgresForTests, tmp_path: Path) -> None:
    url = postgres.new_database()
    try:
        path = tmp_path / "config.yaml"
        path.write_text("model_list:" + GOOD_MODEL + f"general_settings:\n  database_url: {url}\n")
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        result = subprocess.run(
            [sys.executable, "-m", "spendledger.api", "migrate", "--config", str(path)],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert _revision(url) is not None
    finally:
        postgres.drop_database(url)


def test_migrate_takes_a_prisma_style_database_url_as_litellm_deployments_write_it(
    postgres: PostgresForTests,
) -> None:
    url = postgres.new_database()
    try:
        joiner = "&" if "?" in url else "?"
        prisma = url + joiner + "schema=public&connection_limit=5&pgbouncer=true"
        result = run_cli("migrate", env={"DATABASE_URL": prisma}, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "pgbouncer" in result.stderr and "database_url_parameters_ignored" in result.stderr
        elsewhere = url + joiner + "schema=nowhere_yet"  # the search_path is the schema: migrations land there
        assert run_cli("migrate", env={"DATABASE_URL": elsewhere}, timeout=120).returncode != 0
    finally:
        postgres.drop_database(url)


def test_migrate_against_an_unreachable_database_fails_with_one_line() -> None:
    result = run_cli("migrate", env={"DATABASE_URL": "postgresql://someone:hunter2@127.0.0.1:9/nothing"})
    line = assert_one_line_failure(result, ["database", "127.0.0.1:9"])
    assert "hunter2" not in line  # the URL's password is never printed


def test_migrate_against_a_missing_database_fails_with_one_line(postgres: PostgresForTests) -> None:
    url = with_database(postgres.admin_url, "sl_no_such_database")
    assert_one_line_failure(run_cli("migrate", env={"DATABASE_URL": url}), ["sl_no_such_database"])


def test_serve_against_an_unreachable_database_fails_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("model_list:" + GOOD_MODEL + "general_settings:\n  master_key: sk-1\n")
    result = run_cli("serve", "--config", str(path), "--port", "9", timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "database" in last and "127.0.0.1:9" in last, result.stderr
