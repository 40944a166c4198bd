"""Execute one run: model x method x ratio x benchmark -> ``results/runs/<run_id>/record.json``.

Order of work, chosen so that bad input never writes anything and a failed run never destroys a
recorded one:

1. check the config and build method and adapter, then name the run (``bench.build``: ratio and
   method options are checked here); skip it if already recorded, or verify it (``bench.verify``);
2. load the model (missing or corrupt weights fail here, before anything is written);
3. claim the run id (a lease with a heartbeat; a stale claim is taken over) and mark it running
   (``bench.claims``);
4. accuracy pass through lmms-eval (``bench.evaluate``);
5. efficiency pass on one fixed sample (``bench.measure.efficiency``);
6. write ``samples.jsonl``, ``config.yaml`` and finally ``record.json``, each atomically, and refresh
   the leaderboard. A run that fails after step 3 leaves a ``failed`` record, unless a completed
   record of the same run id exists, which is kept untouched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import task_data
from bench.build import ModelCache, Run, build_run
from bench.claims import claim, claim_state, release, running
from bench.evaluate import accuracy_pass
from bench.measure.efficiency import efficiency_pass
from bench.provenance import now, provenance
from bench.records import read_record, write_json, write_jsonl, write_yaml
from bench.schema import SCHEMA_VERSION
from bench.verify import verify_run

log = logging.getLogger("bench")


@dataclass
class RunResult:
    """What :func:`execute` did, for the CLI and the scripts that run sweeps."""

    #: the run's record: the new one, the existing one when skipped, ``{"run_id", "status": "running"}``
    #: when another job holds the run
    record: dict[str, Any]
    #: with ``verify=true`` on a completed record: :func:`bench.verify.verify_run`'s report
    verify: dict[str, Any] | None = None
    #: the results dir whose leaderboard awaits a refresh (a record written with ``refresh=False``)
    refresh_pending: str | None = None

    @property
    def run_id(self) -> str:
        return self.record["run_id"]

    @property
    def mismatch(self) -> str | None:
        """One line when ``verify=true`` found the record not reproduced."""
        return (self.verify or {}).get("mismatch")


def execute(cfg: dict[str, Any], refresh: bool = True, models: ModelCache | None = None) -> RunResult:
    """Run one fully resolved config.

    With ``verify=true`` a completed record is not skipped but re-run and compared with (the report is
    ``RunResult.verify``); a run with no record runs as usual.

    ``refresh=False`` leaves the leaderboard alone and says so in ``RunResult.refresh_pending``: a
    sweep executed in one process rebuilds it once at its end (``bench.cli``) instead of after each of
    its runs. ``models``: the sweep's :class:`~bench.build.ModelCache` (none: the model is loaded anew).
    """
    t0 = time.time()
    run = build_run(cfg)
    models = models if models is not None else ModelCache()
    rid, rdir = run.run_id, run.dir
    existing = read_record(rdir / "record.json")
    if _completed(existing) and not cfg.get("overwrite", False):
        if cfg.get("verify", False):
            return RunResult(existing, verify=verify_run(run, existing, models))
        log.info("run %s already recorded at %s; skipping (overwrite=true re-runs it)", rid, rdir)
        print(f"[bench] skip {rid}: already recorded ({rdir / 'record.json'})")
        return RunResult(existing)
    adapter = models.load(cfg, run.adapter)  # missing/corrupt weights raise a BenchError here: nothing written yet

    base = _base_record(cfg, rid, started=now(), deviations=run.method.deviations, resolved=run.method.resolved_options())
    if not claim(rdir, overwrite=bool(cfg.get("overwrite", False))):
        st = claim_state(rdir)
        hint = "" if st.state == "alive" else "; overwrite=true takes it over"
        print(f"[bench] skip {rid}: being executed by another job ({rdir / '.claim'}: {st.reason}{hint})")
        return RunResult(existing or {"run_id": rid, "status": "running"})
    existing = read_record(rdir / "record.json")  # another job may have finished it meanwhile
    if _completed(existing) and not cfg.get("overwrite", False):
        release(rdir)
        print(f"[bench] skip {rid}: already recorded ({rdir / 'record.json'})")
        return RunResult(existing)
    with running(rdir, base, existing, t0, on_failed=lambda failed: _sink(failed, cfg)):
        record, samples = _measure(run, adapter, base, t0)
        if samples is not None:
            write_jsonl(rdir / "samples.jsonl", samples)
        write_yaml(rdir / "config.yaml", cfg)
        write_json(rdir / "record.json", record)
    _sink(record, cfg)
    pending = None
    if refresh:
        from bench.aggregate import refresh_leaderboard

        refresh_leaderboard(cfg["results_dir"])
    else:
        pending = str(cfg["results_dir"])
    _print_summary(record, rdir)
    return RunResult(record, refresh_pending=pending)


def _completed(record: dict[str, Any] | None) -> bool:
    return record is not None and record.get("status") == "completed"


def _base_record(cfg: dict[str, Any], rid: str, started: str, deviations: tuple[str, ...] = (), resolved: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keys every record of this run carries: running marker, failed and completed alike."""
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": rid,
        "model": cfg["model"]["name"],
        "method": cfg["method"]["name"],
        "ratio": float(cfg["ratio"]),
        "benchmark": cfg["benchmark"]["name"],
        "task": cfg["benchmark"]["task"],
        "data": task_data.resolve(cfg["benchmark"]).info,
        "seed": int(cfg["seed"]),
        "limit": cfg["benchmark"].get("limit"),
        "primary_metric": cfg["benchmark"]["metric"],
        "method_deviations": list(deviations),
        "method_resolved": dict(resolved or {}),
        "config": cfg,
        "started_at": started,
    }


def _measure(run: Run, adapter, base: dict[str, Any], t0: float) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """Accuracy and efficiency passes; returns the completed record and the per-document samples
    (None without an accuracy pass)."""
    cfg, method = run.cfg, run.method
    notes: list[str] = []
    measure = cfg.get("measure", {})
    do_acc = bool(measure.get("accuracy", True))
    acc = None
    if do_acc and adapter.weights == "random":
        notes.append("accuracy not measured: random weights give meaningless answers")
        do_acc = False
    elif not do_acc:
        notes.append("accuracy not measured: measure.accuracy=false (efficiency-only run)")
    if do_acc:
        acc = accuracy_pass(cfg, adapter, method, run.run_id)
    eff, n = efficiency_pass(measure, adapter, method, acc, seed=int(cfg["seed"]))
    notes += n
    _visual_tokens(eff, adapter, method, cfg, acc)
    prov = provenance(cfg, adapter, run.fingerprints, acc["lm"].batch_size if acc else None)
    if prov.get("weights_format") in ("pickle", "hub-pickle"):
        notes.append("weights loaded from pickled files (model.allow_pickle_weights=true): not safetensors")
    record = {
        **base,
        "status": "completed",
        "accuracy_measured": acc is not None,
        "n_samples": len(acc["samples"]) if acc else None,
        "metrics": acc["metrics"] if acc else {},
        "efficiency": eff,
        "provenance": prov,
        "notes": notes,
        "error": None,
        "finished_at": now(),
        "wall_s": round(time.time() - t0, 2),
    }
    return record, acc["samples"] if acc is not None else None


def _visual_tokens(eff: dict[str, Any], adapter, method, cfg: dict[str, Any], acc: dict[str, Any] | None) -> None:
    """The visual tokens the LLM saw, into ``eff``: averaged over the evaluated samples when accuracy
    was measured, else those of the efficiency pass's sample."""
    n_vis = eff.pop("measured_visual_tokens_in", None)
    if acc is not None and acc["stats"]:
        st = acc["stats"]
        n_vis = sum(s["visual_tokens_in"] for s in st) / len(st)
        kept = sum(s["visual_tokens_kept"] for s in st) / len(st)
        per_layer = [sum(col) / len(st) for col in zip(*(s["visual_tokens_per_layer"] for s in st))]
    else:
        kept = eff.get("measured_visual_tokens_kept")
        per_layer = eff.get("measured_visual_tokens_per_layer")
    eff.pop("measured_visual_tokens_kept", None)
    eff.pop("measured_visual_tokens_per_layer", None)
    if n_vis is None:  # nothing measured: the family's reference grid
        n_vis = adapter.grid[0] * adapter.grid[1]
    # a count per image (LLaVA-NeXT's anyres, Qwen2.5-VL's dynamic resolution) averages to a float
    n_vis = int(n_vis) if float(n_vis).is_integer() else round(float(n_vis), 3)
    eff["visual_tokens_in"] = n_vis
    eff["visual_tokens_kept"] = kept
    eff["visual_tokens_per_layer"] = [round(x, 3) for x in per_layer] if per_layer else None
    eff["visual_tokens_layer_mean"] = round(sum(per_layer) / len(per_layer), 3) if per_layer else None
    eff.update(method.budget_fields(n_vis, adapter.num_llm_layers, kept, per_layer))  # budget_mode, budget_met, ...


def _sink(record: dict[str, Any], cfg: dict[str, Any]) -> None:
    """Send a record to the configured experiment logger (W&B); never raises."""
    from bench.wandb_sink import log_run

    log_run(record, cfg.get("logger") or {})


def _latency(e: dict[str, Any]) -> str:
    """``prefill=<median> ms`` with its spread; on CPU labelled indicative, with the host load."""
    if e.get("prefill_ms") is None:
        return ""
    info = [str(e.get("timer"))]
    if e.get("prefill_ms_iqr") is not None:
        info.append(f"IQR {e['prefill_ms_iqr']:.1f} ms")
    if e.get("device") == "cpu":
        if e.get("host_load") is not None:
            info.append(f"host load {e['host_load']:.2f}/core")
        info.append("CPU: indicative only")
    return f"prefill={e['prefill_ms']:.1f} ms ({', '.join(info)})"


def _print_summary(rec: dict[str, Any], rdir: Path) -> None:
    m = rec["metrics"].get(rec["primary_metric"], {}).get("value") if rec["metrics"] else None
    e = rec["efficiency"]
    parts = [
        f"run {rec['run_id']}",
        f"{rec['model']} / {rec['method']} / ratio={rec['ratio']} / {rec['benchmark']}",
        f"{rec['primary_metric']}={m:.4f}" if m is not None else "accuracy=n/a",
        f"visual tokens {e['visual_tokens_kept']:.1f}/{e['visual_tokens_in']}" if e.get("visual_tokens_kept") is not None else "",
        f"TFLOPs={e['tflops_prefill']:.4f}" if e.get("tflops_prefill") is not None else "",
        _latency(e),
        f"{rec['wall_s']} s",
    ]
    print("[bench] " + " | ".join(p for p in parts if p))
    print(f"[bench] record: {rdir / 'record.json'}")
