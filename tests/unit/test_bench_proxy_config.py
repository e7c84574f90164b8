"""scripts/bench/proxy.py configures spendledger as it says: Lago and the signed webhook sink, or
(`--no-webhooks`) Lago alone; both files are valid config.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scripts.bench.fake_upstream import LITELLM_WEBHOOK_PATH
from scripts.bench.proxy import litellm_config, litellm_env, spendledger_config
from spendledger.ledger.config import load_settings

ENVIRON = {
    "LAGO_API_BASE": "http://127.0.0.1:1",
    "LAGO_API_KEY": "k",
    "LAGO_API_EVENT_CODE": "llm_usage",
    "WEBHOOK_URL": "http://127.0.0.1:1/webhook",
}


@pytest.mark.parametrize("webhooks", [True, False])
def test_the_benchmark_config_has_the_webhook_sink_only_when_asked(tmp_path: Path, webhooks: bool) -> None:
    config = tmp_path / "spendledger.yaml"
    config.write_text(spendledger_config("http://127.0.0.1:2", webhooks))
    settings = load_settings(config, ENVIRON)
    assert settings.lago is not None
    assert (settings.webhook is not None) is webhooks
    assert settings.budget_leases  # the benchmark measures the default


@pytest.mark.parametrize("callbacks", [True, False])
def test_litellm_does_the_same_job_as_spendledger_unless_asked_bare(callbacks: bool) -> None:
    config = yaml.safe_load(litellm_config("http://127.0.0.1:2", callbacks))
    assert config["model_list"][0]["model_name"] == "fake-openai-endpoint"
    assert config.get("litellm_settings", {}).get("callbacks") == (["lago"] if callbacks else None)
    assert config["general_settings"].get("alerting") == (["webhook"] if callbacks else None)
    env = litellm_env("http://127.0.0.1:3")
    assert env["WEBHOOK_URL"] == "http://127.0.0.1:3" + LITELLM_WEBHOOK_PATH  # counted apart by the fake
    assert env["LAGO_API_BASE"] == "http://127.0.0.1:3"
