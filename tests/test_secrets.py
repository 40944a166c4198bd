"""No secret reaches disk (issue 28): secret-looking config keys are redacted in records, config.yaml, the
W&B config and logs; Hydra's own files only see an environment interpolation."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.redaction import REDACTED, hide_secret_overrides, install_log_filter, is_secret_key, redact


ROOT = Path(__file__).resolve().parent.parent


def test_secret_keys():
    for k in ("api_key", "apikey", "WANDB_API_KEY", "hf_token", "hfToken", "db_password", "client_secret", "secret", "credentials", "aws_secret_access_key"):
        assert is_secret_key(k), k
    for k in ("max_new_tokens", "image_token_ratio_list", "tokenizer", "keep_ratio", "monkey", "visual_tokens_kept", "primary_metric"):
        assert not is_secret_key(k), k


def test_redact_keeps_numbers_and_other_keys():
    cfg = {"logger": {"api_key": "s3cr3t-value", "mode": "offline"}, "method": {"pivot_image_token": 4, "image_token_ratio_list": [0.5]},
           "local": {"credentials": {"user": "me", "pass": "hunter2hunter2"}}, "seeds": [{"token": "tok-abcdef"}]}
    out = redact(cfg)
    assert out["logger"] == {"api_key": REDACTED, "mode": "offline"}
    assert out["method"] == cfg["method"]
    assert out["local"]["credentials"] == REDACTED and out["seeds"][0]["token"] == REDACTED
    assert cfg["logger"]["api_key"] == "s3cr3t-value"  # the input is not changed


def test_log_lines_mask_seen_secrets(caplog):
    install_log_filter()
    redact({"hf_token": "hf_planted_in_a_log"})
    with caplog.at_level(logging.INFO):
        logging.getLogger("bench.test").info("config: %s", {"token": "hf_planted_in_a_log"})
    assert "hf_planted_in_a_log" not in caplog.text and REDACTED in caplog.text


def test_overrides_go_through_the_environment(monkeypatch):
    args = hide_secret_overrides(["+local.api_key=abc123secret", "method=random", "+local.hf_token=${oc.env:HF}"])
    assert args[1:] == ["method=random", "+local.hf_token=${oc.env:HF}"]
    key, value = args[0].split("=", 1)
    assert key == "+local.api_key" and value.startswith("${oc.env:BENCH_SECRET_") and os.environ[value[9:-1]] == "abc123secret"
    monkeypatch.delenv(value[9:-1])


@pytest.mark.integration
def test_a_planted_secret_reaches_no_file(tmp_path):
    """A sweep (so Hydra writes multirun.yaml) with W&B offline; every file written anywhere under the
    working directory, and the console output, are searched for the secret."""
    secret = "PLANTED-s3cr3t-8f2a61"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    r = subprocess.run([sys.executable, "-m", "bench", "run", "-m", f"+local.api_key={secret}", f"+local.hf_token={secret}x",
                        "benchmark.limit=4", "measure.repeats=1", "measure.warmup=0", f"results_dir={tmp_path / 'results'}",
                        "logger=wandb", f"logger.dir={tmp_path / 'wb'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "record.json" for p in files) and any(p.name == "multirun.yaml" for p in files)
    assert any("wandb" in p.parts for p in files)
    leaks = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert not leaks, leaks
    assert secret not in r.stdout and secret not in r.stderr
    rec = next(p for p in files if p.name == "record.json").read_text()
    assert '"api_key": "<redacted>"' in rec
