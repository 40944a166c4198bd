"""The Hydra tree is the registry: every group composes, names come from files, run ids are stable."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench.records import run_id

CONF = Path(__file__).resolve().parent.parent / "conf"


def resolved(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def test_defaults_are_the_embedded_model():
    cfg = resolved()
    assert (cfg["model"]["name"], cfg["method"]["name"], cfg["benchmark"]["name"]) == ("tiny_llava_synth", "none", "synthvqa")
    assert cfg["ratio"] == 0.0


@pytest.mark.parametrize("group", ["model", "method", "benchmark", "measure", "logger"])
def test_every_option_composes_and_is_named_after_its_file(group):
    for f in sorted((CONF / group).glob("*.yaml")):
        cfg = resolved(f"{group}={f.stem}")
        if "name" in cfg[group] and group != "logger":
            assert cfg[group]["name"] == f.stem


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_model_configs_build_adapters(name):
    from bench.build import build_adapter

    a = build_adapter(resolved(f"model={name}", "device=cpu"))
    assert a.name == name


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "benchmark").glob("*.yaml")))
def test_benchmark_configs_have_task_metric_batch(name):
    b = resolved(f"benchmark={name}")["benchmark"]
    assert b["task"] and b["metric"] and b["batch_size"] >= 1


def test_run_id_is_stable_and_sensitive():
    fp = {"model": "abc", "benchmark": "synthvqa-gen1"}
    a = run_id(resolved("method=random", "ratio=0.5"), fp)
    assert a == run_id(resolved("method=random", "ratio=0.5"), fp)
    assert len(a) == 10 and int(a, 16) >= 0
    assert a != run_id(resolved("method=random", "ratio=0.75"), fp)
    assert a != run_id(resolved("method=pool", "ratio=0.5"), fp)
    assert a != run_id(resolved("method=random", "ratio=0.5", "seed=1"), fp)
    # retrained weights or regenerated data change the identity
    assert a != run_id(resolved("method=random", "ratio=0.5"), {**fp, "model": "xyz"})
    assert a != run_id(resolved("method=random", "ratio=0.5"), {**fp, "benchmark": "synthvqa-gen2"})
    # an int ratio on the command line is the same run as the float default
    from bench.records import canonicalize

    assert run_id(canonicalize(resolved("method=random", "ratio=0")), fp) == run_id(canonicalize(resolved("method=random")), fp)
    # where results go and whether to overwrite do not
    assert a == run_id(resolved("method=random", "ratio=0.5", "results_dir=/elsewhere", "overwrite=true"), fp)


def test_known_run_id_value():
    """Pins the hashing scheme: changing it silently would orphan every recorded run."""
    cfg = {"ratio": 0.5, "seed": 0, "method": {"name": "random"}}
    assert run_id(cfg, {"model": "m", "benchmark": "b"}) == run_id(dict(reversed(list(cfg.items()))), {"benchmark": "b", "model": "m"})
    import hashlib
    import json

    blob = json.dumps({**cfg, "_fingerprints": {"benchmark": "b", "model": "m"}}, sort_keys=True, separators=(",", ":"))
    assert run_id(cfg, {"model": "m", "benchmark": "b"}) == hashlib.sha1(blob.encode()).hexdigest()[:10]
