"""Verification (``verify=true``): re-answer a recorded run and compare every answer with its record."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench import environment
from bench.build import ModelCache, Run
from bench.errors import CorruptFileError
from bench.evaluate import accuracy_pass


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The per-document rows of a record's ``samples.jsonl``; a missing or unreadable file is an error."""
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise CorruptFileError(f"{path} is missing: the record cannot be verified without its per-document predictions") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path} cannot be read ({e}); re-run with overwrite=true to record it again") from None


def environment_difference(record: dict[str, Any]) -> list[str] | None:
    """``name: recorded -> installed`` per differing distribution; None if the record lists none."""
    recorded = (record.get("provenance") or {}).get("distributions")
    if not isinstance(recorded, dict):
        return None
    return environment.compare(recorded, environment.installed())


def verify_run(run: Run, existing: dict[str, Any], models: ModelCache) -> dict[str, Any]:
    """Re-run a completed record's benchmark and compare the answers with it.

    Every document's prediction and the value of every recorded metric must come out identical;
    lmms-eval's response cache is bypassed so that the model really answers again. Efficiency is not
    compared: timings measure the machine, not the result. Nothing is written: the record, its samples
    and the leaderboard stay as they are.

    Returns a report: ``reproduced`` (bool, or None when the record has no answers to compare) and, when
    it is False, ``mismatch``: one line saying what differs (the CLI lists these and exits 3).
    """
    rid = run.run_id
    if not existing.get("accuracy_measured"):
        why = next((n for n in existing.get("notes") or [] if n.startswith("accuracy not measured")), "accuracy not measured")
        print(f"[bench] verify {rid}: nothing to compare ({why})")
        return {"run_id": rid, "reproduced": None, "reason": why, "mismatch": None}
    recorded = read_samples(run.dir / "samples.jsonl")
    adapter = models.load(run.cfg, run.adapter)
    t0 = time.time()
    fresh_cfg = {**run.cfg, "benchmark": {**run.cfg["benchmark"], "use_cache": None}}
    acc = accuracy_pass(fresh_cfg, adapter, run.method, rid)
    old = {r["doc_id"]: r.get("prediction") for r in recorded}
    new = {r["doc_id"]: r.get("prediction") for r in acc["samples"]}
    missing = object()  # a document answered on one side only differs too
    differ = sorted((d for d in old.keys() | new.keys() if old.get(d, missing) != new.get(d, missing)), key=str)
    metrics = {}
    for name, m in (existing.get("metrics") or {}).items():
        now = (acc["metrics"].get(name) or {}).get("value")
        metrics[name] = {"recorded": m.get("value"), "now": now}
    changed = [k for k, v in metrics.items() if v["recorded"] != v["now"]]
    ok = not differ and not changed
    pm = existing.get("primary_metric")
    head = f"[bench] verify {rid} ({existing.get('model')} / {existing.get('method')} / ratio={existing.get('ratio')} / {existing.get('benchmark')}): "
    mismatch = env_diff = cpu_diff = None
    if ok:
        print(head + f"reproduced: {len(new)}/{len(old)} answers identical, {pm}={metrics.get(pm, {}).get('now')} as recorded ({time.time() - t0:.0f} s)")
    else:
        shown = ", ".join(map(str, differ[:8])) + (" ..." if len(differ) > 8 else "")
        parts = [f"{len(differ)} of {len(old)} answers differ" + (f" (documents {shown})" if differ else "")]
        parts += [f"{k}: recorded {metrics[k]['recorded']}, now {metrics[k]['now']}" for k in changed]
        line = "; ".join(parts)
        print(head + "NOT reproduced: " + line)
        env_diff, cpu_diff = environment_difference(existing), cpu_difference(existing, adapter)
        _print_environment_difference(env_diff)
        _print_cpu_difference(existing, cpu_diff)
        mismatch = f"{rid}: {line}"
    return {"run_id": rid, "reproduced": ok, "answers": len(old), "differ": differ, "metrics": metrics,
            "environment_differs": env_diff, "cpu_differs": cpu_diff, "mismatch": mismatch}


def cpu_difference(record: dict[str, Any], adapter) -> bool | None:
    """Whether a CPU record was made on another CPU than this one (None: not a CPU run on both sides, or the record
    names no CPU). Kernels reduce in another order on another CPU, so a near tie may round the other way."""
    recorded = (record.get("provenance") or {}).get("cpu")
    if recorded is None or (record.get("efficiency") or {}).get("device") != "cpu" or str(getattr(adapter, "device", "cpu")) != "cpu":
        return None
    return recorded != environment.cpu()


def _print_cpu_difference(existing: dict[str, Any], differs: bool | None) -> None:
    """What :func:`cpu_difference` found (``differs``), in words; nothing where neither side ran on a CPU."""
    here = environment.cpu()
    if differs is None and (existing.get("efficiency") or {}).get("device") == "cpu" and not (existing.get("provenance") or {}).get("cpu"):
        print(f"[bench]   the record names no CPU (recorded before CPUs were recorded); re-answered on {here}: another CPU's "
              "float rounding can flip near-tied answers")
    elif differs:
        print(f"[bench]   recorded on another CPU ({existing['provenance']['cpu']}), re-answered on {here}: its float rounding "
              "can flip near-tied answers")
    elif differs is False:
        print(f"[bench]   recorded on this CPU ({here}): the difference is not the machine")


def _print_environment_difference(env_diff: list[str] | None) -> None:
    """What :func:`environment_difference` found, in words."""
    if env_diff is None:
        print("[bench]   the record names no installed distributions (recorded before environments were recorded)")
    elif env_diff:
        print(f"[bench]   the environment differs from the record's in {len(env_diff)} package(s):")
        for d in env_diff[:40]:
            print(f"[bench]     {d}")
        if len(env_diff) > 40:
            print(f"[bench]     ... and {len(env_diff) - 40} more")
    else:
        print("[bench]   the installed distributions are the record's: the difference is not the Python environment")
