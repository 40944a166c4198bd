"""``python -m bench status``: what has become of every run of a sweep.

Each combination of the sweep (``bench.sweep.expand``) is named by its run id exactly as ``bench.build``
names a run, then classified from its record and its claim (``bench.claims``): completed / failed /
running / killed / stale / refused / missing. A sweep's own overrides can be read back from its multirun
directory (:func:`sweep_dir_overrides`), so a user need not retype them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.claims import job_alive
from bench.sweep import expand


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
    from bench.build import benchmark_fingerprint, build_adapter, build_method, run_fingerprints
    from bench.errors import BenchError
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
        try:
            method = build_method(cfg)
        except BenchError:  # a bad method setting: the run is refused below, its id needs no text tower
            method = None
        rid = run_id(cfg, run_fingerprints(cfg, method, adapters[mkey], fps[mkey]) if method is not None
                     else {"model": fps[mkey], "benchmark": benchmark_fingerprint(cfg["benchmark"])})
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
