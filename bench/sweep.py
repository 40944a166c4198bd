"""Expanding a sweep into its runs, and what has become of each (``python -m bench status``).

A sweep is the same set of overrides ``python -m bench run -m ...`` takes (comma lists, ``glob(...)``,
``range(...)``, presets such as ``+sweep=demo``); every combination is composed with Hydra's compose
API and mapped to its run id, exactly as ``bench.build`` names a run, so status never guesses.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any

from bench.claims import job_alive

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


def sweep_dir_overrides(path: str | Path) -> list[str] | None:
    """The overrides a sweep was started with, read from its multirun directory (None: not one).

    Hydra saves the sweep's config, its command-line overrides included, as ``<sweep dir>/multirun.yaml``
    (``hydra.overrides.task``); where that file is missing, the jobs' ``<n>/.hydra/overrides.yaml`` are
    read instead (each one job's overrides, merged into comma lists). A secret handed to Hydra as
    ``${oc.env:BENCH_SECRET_i}`` (``bench.redaction``) is left out: secrets never take part in a run's
    identity, and the variable is gone after the sweep.
    """
    import yaml

    p = Path(path)
    if p.is_file() and p.name in ("multirun.yaml", "overrides.yaml"):
        p = p.parent if p.name == "multirun.yaml" else p.parent.parent
    if not p.is_dir():
        return None
    overrides: list[str] | None = None
    mr = p / "multirun.yaml"
    if mr.is_file():
        doc = yaml.safe_load(mr.read_text()) or {}
        overrides = list((((doc.get("hydra") or {}).get("overrides") or {}).get("task")) or [])
    else:
        jobs = [yaml.safe_load(f.read_text()) or [] for f in sorted(p.glob("*/.hydra/overrides.yaml"))]
        if not jobs:
            return None
        values: dict[str, list[str]] = {}
        for job in jobs:
            for o in job:
                k, _, v = str(o).partition("=")
                if v not in values.setdefault(k, []):
                    values[k].append(v)
        overrides = [f"{k}={','.join(v)}" for k, v in values.items()]
    return [o for o in overrides if "oc.env:BENCH_SECRET" not in o]


def _refusal(cfg: dict[str, Any], adapter) -> str | None:
    """Why ``python -m bench run`` would refuse this combination with exit code 2 before any work
    (a bad setting, a method option the method refuses, a method this model cannot run), or None."""
    from bench.build import build_method, validate
    from bench.errors import BenchError
    from bench.validate import check_config

    try:
        validate(cfg)
        check_config(cfg)
        adapter.check_method(build_method(cfg))
    except BenchError as e:
        return str(e)
    return None


def status(args: list[str], results_dir: str | None = None) -> dict[str, Any]:
    """Classify every run of a sweep: completed / failed / running / killed / stale / refused / missing.

    ``stale``: no record (or an unfinished one) and a claim that the next run takes over (empty,
    dead or expired, ``bench.claims``); ``refused``: a combination ``run`` would reject with exit
    code 2 before any work, so it will never have a record.
    """
    from bench.build import benchmark_fingerprint, build_adapter
    from bench.claims import claim_state
    from bench.records import read_record, run_dir, run_id

    adapters: dict[str, Any] = {}
    fps: dict[str, str] = {}
    rows = []
    for cfg in expand(args):
        mkey = repr(sorted(cfg["model"].items()))
        if mkey not in adapters:
            adapters[mkey] = build_adapter(cfg)
            fps[mkey] = adapters[mkey].fingerprint()
        rid = run_id(cfg, {"model": fps[mkey], "benchmark": benchmark_fingerprint(cfg["benchmark"])})
        rdir = run_dir(results_dir or cfg["results_dir"], rid)
        rec = read_record(rdir / "record.json")
        state = "missing" if rec is None else rec.get("status", "corrupt")
        error = (rec or {}).get("error")
        if state == "running" and job_alive(rec.get("job")) is False:
            state = "killed"
        if state != "completed":
            cs = claim_state(rdir)
            if cs.stale and state != "failed":
                state, error = "stale", f"stale claim, taken over by the next run: {cs.reason}"
            elif cs.state in ("alive", "unknown") and state == "missing":
                state = "running"  # claimed, its record not written yet (the model is loading)
        if state == "missing":
            why = _refusal(cfg, adapters[mkey])
            if why:
                state, error = "refused", why
        rows.append({"run_id": rid, "model": cfg["model"]["name"], "method": cfg["method"]["name"], "ratio": cfg["ratio"], "benchmark": cfg["benchmark"]["name"], "status": state, "error": error})
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {"rows": rows, "counts": counts, "total": len(rows)}
