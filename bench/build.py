"""Building a run from its config: check it, instantiate the method and the model adapter, name it.

Nothing here writes a file or loads weights: bad input (a ratio out of range, a method option the
method refuses, a method the model cannot run) fails here, before a run leaves any trace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import task_data
from bench.errors import BenchError, ConfigError
from bench.records import canonicalize, run_dir, run_id

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose_config(overrides: list[str]) -> dict:
    """The resolved config of ``conf/config.yaml`` with Hydra ``overrides``, outside ``@hydra.main``
    (for scripts that build runs themselves)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)


def validate(cfg: dict[str, Any]) -> None:
    """Checks that need no model: ratio range, required keys."""
    ratio = cfg.get("ratio")
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise ConfigError(f"ratio must be a number in [0, 1) (the fraction of visual tokens removed), got {ratio!r}") from None
    if not 0.0 <= r < 1.0:
        raise ConfigError(f"ratio must be in [0, 1) (the fraction of visual tokens removed), got {r}")
    for group in ("model", "method", "benchmark"):
        if not isinstance(cfg.get(group), dict) or "name" not in cfg[group]:
            raise ConfigError(f"config group {group!r} is missing or has no name")
    bs = cfg["benchmark"].get("batch_size")
    if bs != "auto" and (not isinstance(bs, int) or isinstance(bs, bool) or bs < 1):
        raise ConfigError(f"benchmark.batch_size must be a positive integer or auto, got {bs!r}")
    lim = cfg["benchmark"].get("limit")
    if lim is not None and (not isinstance(lim, int) or lim < 1):
        raise ConfigError(f"benchmark.limit must be null or a positive integer, got {lim!r}")


def build_method(cfg: dict[str, Any]):
    """Instantiate ``cfg["method"]`` (a class in ``methods/``); validates the ratio."""
    from hydra.utils import instantiate

    mcfg = {k: v for k, v in cfg["method"].items() if k not in ("name", "description")}
    try:
        return instantiate(mcfg, _convert_="all")
    except Exception as e:  # hydra wraps constructor errors in InstantiationException
        cause = e
        while cause.__cause__ is not None and not isinstance(cause, BenchError):
            cause = cause.__cause__
        if isinstance(cause, BenchError):
            raise cause from None
        raise ConfigError(f"cannot build method {cfg['method'].get('name')!r}: {e}") from None


def build_adapter(cfg: dict[str, Any]):
    """Instantiate the model adapter of ``cfg["model"]`` (weights are loaded later by ``load()``)."""
    from hydra.utils import get_class

    mcfg = dict(cfg["model"])
    cls = get_class(mcfg.pop("_target_"))
    return cls(**mcfg)


def benchmark_fingerprint(bcfg: dict[str, Any]) -> str:
    """Identity of the benchmark data (``bench.task_data``): SynthVQA's generator version, or for an
    lmms-eval task its YAML digest, dataset fingerprint/revision, split, size and limit. Checks that the
    data is available (ConfigError, exit 2) before anything is loaded or written."""
    return task_data.resolve(bcfg).fingerprint


@dataclass
class Run:
    """A checked run, built but not loaded (the adapter has no weights yet)."""

    cfg: dict[str, Any]  # the resolved config, canonicalised (``ratio=0`` is ``0.0``)
    method: Any  # a ``methods.base.PruningMethod``
    adapter: Any  # a ``bench.models.base.ModelAdapter``
    fingerprints: dict[str, str]  # {"model": ..., "benchmark": ...}: content identities in the run id
    run_id: str
    dir: Path  # <results_dir>/runs/<run_id>


def run_fingerprints(cfg: dict[str, Any], method, adapter, model_fingerprint: str | None = None) -> dict[str, str]:
    """The content identities a run id hashes besides the config: the model's weights, the benchmark's data and,
    for question-conditioned methods, the CLIP text tower's weights. ``bench status`` names runs with this too."""
    from bench.models.clip_text import needs_text

    fingerprints = {"model": model_fingerprint or adapter.fingerprint(), "benchmark": benchmark_fingerprint(cfg["benchmark"])}
    if needs_text(method) and hasattr(adapter, "text_tower_fingerprint"):
        # model.text_tower is not in the identity (runs of other methods never read it): its weights are, here
        fingerprints["text_tower"] = adapter.text_tower_fingerprint()
    return fingerprints


def build_run(cfg: dict[str, Any]) -> Run:
    """Check ``cfg``, build its method and adapter (and check the adapter can run the method), name it."""
    validate(cfg)
    canonicalize(cfg)
    method = build_method(cfg)
    adapter = build_adapter(cfg)
    adapter.check_method(method)
    fingerprints = run_fingerprints(cfg, method, adapter)
    rid = run_id(cfg, fingerprints)
    return Run(cfg, method, adapter, fingerprints, rid, run_dir(cfg["results_dir"], rid))


class ModelCache:
    """The adapter loaded for the previous run, reused by the next run of an identical model config.

    Sweeps executed in one process (multirun's basic launcher, ``benchmarks/efficiency_leaderboard.py``)
    would otherwise rebuild a 7B model for every point. Only one model is kept, so memory stays
    bounded. Whoever runs the sweep owns the cache and passes it to every ``execute``.
    """

    def __init__(self) -> None:
        self._key: str | None = None
        self._adapter = None

    def load(self, cfg: dict[str, Any], adapter):
        """``adapter`` loaded, or the cached adapter of the same ``cfg["model"]``; missing or corrupt
        weights raise a :class:`~bench.errors.BenchError`."""
        import torch

        key = json.dumps(cfg["model"], sort_keys=True, default=str)
        if key == self._key:
            return self._adapter
        self._key = self._adapter = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        adapter.load()
        self._key, self._adapter = key, adapter
        return adapter
