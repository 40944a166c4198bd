"""Expanding a sweep into its runs (what has become of each: ``bench.status``).

A sweep is the same set of overrides ``python -m bench run -m ...`` takes (comma lists, ``glob(...)``,
``range(...)``, presets such as ``+sweep=demo``); every combination is composed with Hydra's compose
API and mapped to its run id, exactly as ``bench.build`` names a run, so status never guesses.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def normalize_none(cfg: dict[str, Any]) -> bool:
    """In a sweep, ``method=none`` at ratio > 0 is the same run as at ratio 0: collapse it.

    Returns True when the config was changed. (A single ``run method=none ratio=0.5`` is an error.)
    """
    if cfg["method"].get("name") == "none" and float(cfg["ratio"]) != 0.0:
        cfg["ratio"] = 0.0
        cfg["method"]["prune_ratio"] = 0.0
        return True
    return False


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _expand_globs(key: str, value: str) -> str:
    m = re.fullmatch(r"\s*glob\((.*)\)\s*", value)
    if not m:
        return value
    pats = [p.strip().strip("'\"") for p in m.group(1).split(",")]
    include = [p for p in pats if not p.startswith("exclude=")]
    opts = [o for o in _group_options(key.lstrip("+")) if any(fnmatch.fnmatch(o, p) for p in include or ["*"])]
    return ",".join(opts)


def sweep_overrides(args: list[str]) -> list[list[str]]:
    """Every combination of a sweep, as lists of plain ``key=value`` overrides."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    args = [a for a in args if a not in ("-m", "--multirun")]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[a for a in args if not _is_sweep(a)], return_hydra_config=True)
    node = cfg.hydra.sweeper.get("params")
    params = OmegaConf.to_container(node, resolve=False) if node else {}
    merged: dict[str, str] = {k: str(v) for k, v in params.items()}
    for a in args:
        k, v = a.split("=", 1)
        merged[k] = v
    overrides = [f"{k}={_expand_globs(k, v)}" for k, v in merged.items() if not k.startswith("hydra")]
    parsed = OverridesParser.create().parse_overrides(overrides)
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(combo) for batch in batches for combo in batch]


def _is_sweep(arg: str) -> bool:
    return "=" in arg and ("," in arg.split("=", 1)[1] or "(" in arg.split("=", 1)[1])


def expand(args: list[str]) -> list[dict[str, Any]]:
    """Resolved configs of every run of a sweep (``none`` collapsed to ratio 0, duplicates dropped)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from bench.records import canonicalize

    preset = [a for a in args if a.startswith("+sweep=")]
    combos = sweep_overrides(args)
    out, seen = [], set()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for combo in combos:
            cfg = OmegaConf.to_container(compose("config", overrides=preset + [c for c in combo if not c.startswith("+sweep=")]), resolve=True)
            normalize_none(cfg)
            canonicalize(cfg)
            key = repr(sorted(cfg.items(), key=lambda kv: kv[0]))
            if key not in seen:
                seen.add(key)
                out.append(cfg)
    return out
