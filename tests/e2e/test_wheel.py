"""The distribution as a user installs it (issue 19): the wheel, not the checkout, in a fresh venv —
one top-level package, migrations and SQL inside it, `spendledger migrate` on the embedded database
and on DATABASE_URL, and a request served.

The fresh venv gets the wheel alone (`--no-deps`); its dependencies come from this test run's venv
by a path entry (no pip resolve, no network), after its own site-packages, so that what is imported
as `spendledger` is the wheel's. It runs in a temporary directory, away from the checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import MASTER_KEY
from tests.support import PROJECT_ROOT, PostgresForTests, free_port

CONFIG = f"""
model_list:
  - model_name: demo
    litellm_params:
      model: mock/demo
    model_info:
      input_cost_per_token: 0.000001
      output_cost_per_token: 0.000003
general_settings:
  master_key: {MASTER_KEY}
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist),
         str(PROJECT_ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    [found] = dist.glob("spendledger-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with the wheel installed; returns its bin directory."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    purelib = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (purelib / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr
    yield venv / "bin"


def run(bin_dir: Path, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DATABASE_URL")}
    return subprocess.run(
        [str(bin_dir / "spendledger"), *args], cwd=cwd, env={**environment, **(env or {})},
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def test_the_wheel_installs_one_package_with_its_migrations_and_sql(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [top_level] = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["spendledger"]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"spendledger"}
    assert "spendledger/migrations/env.py" in names
    assert any(n.startswith("spendledger/migrations/versions/0001_") for n in names)
    assert "spendledger/ledger/sql/periods.sql" in names
    # The admin UI's templates and assets ship inside the package (no CDN, no build step).
    for page_file in ("templates/base.html", "templates/budgets.html", "static/ui.css", "static/ui.js"):
        assert f"spendledger/api/ui/{page_file}" in names


def test_the_installed_cli_migrates_the_embedded_database_and_serves(installed: Path, tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(CONFIG)
    version = run(installed, "--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("spendledger "), version.stderr
    where = subprocess.run(
        [str(installed / "python"), "-c", "import spendledger; print(spendledger.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert str(installed.parent) in where.stdout, where.stdout + where.stderr  # the wheel's, not the checkout's
    data = {"SPENDLEDGER_DATA_DIR": str(tmp_path / "data")}
    migrated = run(installed, "migrate", "--config", "config.yaml", cwd=tmp_path, env=data)
    assert migrated.returncode == 0, migrated.stderr

    port = free_port()
    server = subprocess.Popen(
        [str(installed / "spendledger"), "serve", "--config", "config.yaml", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env={**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DATABASE_URL")}, **data},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health/readiness", timeout=2).status_code in (200, 503):
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        answer = httpx.post(
            f"{base}/chat/completions", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=30,
            json={"model": "demo", "messages": [{"role": "user", "content": "hello there"}], "user": "wheel-customer"},
        )  # fmt: skip
        assert answer.status_code == 200, answer.text
        assert json.loads(answer.headers["x-litellm-response-cost"]) > 0
        # The admin UI from the installed package: its sign-in page and its stylesheet.
        sign_in = httpx.get(f"{base}/ui/login", timeout=30)
        assert sign_in.status_code == 200 and 'label for="f-api_key">API key' in sign_in.text
        assert httpx.get(f"{base}/ui/static/ui.css", timeout=30).status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_the_installed_cli_migrates_database_url(installed: Path, postgres: PostgresForTests, tmp_path: Path) -> None:
    url = postgres.new_database()  # already migrated: migrate says so and changes nothing
    try:
        (tmp_path / "config.yaml").write_text(CONFIG)
        migrated = run(installed, "migrate", "--config", "config.yaml", cwd=tmp_path, env={"DATABASE_URL": url})
        assert migrated.returncode == 0, migrated.stderr
    finally:
        postgres.drop_database(url)
