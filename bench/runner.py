"""Execute one run: model x method x ratio x benchmark -> ``results/runs/<run_id>/record.json``.

Order of work, chosen so that bad input never writes anything and a failed run never destroys a
recorded one:

1. validate the config and build the method (ratio and method options are checked here);
2. compute the run id from the resolved config and content fingerprints; skip if already recorded;
3. load the model (missing or corrupt weights fail here, before anything is written);
4. accuracy pass through lmms-eval (``simple_evaluate`` with the project's model instance);
5. efficiency pass on one fixed sample (``bench.measure.efficiency``);
6. write ``samples.jsonl``, ``config.yaml`` and finally ``record.json``, each atomically, and refresh
   the leaderboard. A run that fails after step 3 leaves a ``failed`` record, unless a completed
   record of the same run id exists, which is kept untouched.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from bench import environment, task_data
from bench.errors import BenchError, ConfigError, CorruptFileError
from bench.records import canonicalize, read_record, run_dir, run_id, write_json, write_jsonl, write_yaml
from bench.schema import SCHEMA_VERSION

log = logging.getLogger("bench")
REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"


# ----------------------------------------------------------------------------- building blocks
def compose_config(overrides: list[str]) -> dict:
    """The resolved config of ``conf/config.yaml`` with Hydra ``overrides``, outside ``@hydra.main``
    (for scripts that build runs themselves)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)


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


_LOADED: dict[str, Any] = {}


def _loaded(cfg: dict[str, Any], adapter):
    """Load the adapter, reusing the one loaded for the previous run of an identical model config.

    Sweeps executed in one process (multirun's basic launcher, the efficiency script) would otherwise
    rebuild a 7B model for every point. Only one model is kept, so memory stays bounded.
    """
    import json

    key = json.dumps(cfg["model"], sort_keys=True, default=str)
    if key in _LOADED:
        return _LOADED[key]
    _LOADED.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    adapter.load()
    _LOADED[key] = adapter
    return adapter


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


def task_manager(bcfg: dict[str, Any]):
    return task_data.task_manager(task_data.resolve(bcfg))


#: what ``git_dirty`` looks at: the code and settings that decide a run's result
RESULT_DECIDING_PATHS = ("bench", "methods", "kernels", "conf", "pyproject.toml", "requirements")


def git_state(root: Path) -> tuple[str | None, bool | None]:
    """``(HEAD commit, dirty)`` of the checkout at ``root``; ``dirty`` looks only at uncommitted changes to
    :data:`RESULT_DECIDING_PATHS` (results/, rewritten by every run, and docs never count).
    ``(None, None)`` outside a git checkout (an installed wheel)."""

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        except Exception:  # noqa: BLE001
            return None

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", *RESULT_DECIDING_PATHS)
    return git("rev-parse", "HEAD"), None if dirty is None else bool(dirty)


def provenance(cfg: dict[str, Any], adapter, fingerprints: dict[str, str], batch_size: int | None = None) -> dict[str, Any]:
    """``batch_size``: the evaluation batch actually used (``benchmark.batch_size=auto`` resolved)."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    setting = cfg["benchmark"]["batch_size"]  # an int, or "auto" (unresolved when no evaluation ran)
    sha, dirty = git_state(REPO_ROOT)
    return {
        "git_sha": sha,
        "git_dirty": dirty,
        "versions": {"torch": torch.__version__, "transformers": ver("transformers"), "lmms_eval": ver("lmms_eval"), "python": platform.python_version()},
        **environment.summary(),
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "attn_implementation": adapter.attn_implementation,
        "batch_size": batch_size if batch_size is not None else (setting if isinstance(setting, int) else None),
        "batch_size_setting": setting,
        "model_fingerprint": fingerprints["model"],
        "weights_revision": adapter.weights_revision(),
        "benchmark_fingerprint": fingerprints["benchmark"],
        "date": _now(),
        "hostname": socket.gethostname(),
    }


class RunKilled(BaseException):
    """SIGTERM arrived (scancel, Slurm time limit, preemption): record the run as failed, then stop."""


def _raise_killed(signum, frame):  # noqa: ARG001
    raise RunKilled(f"killed by signal {signal.Signals(signum).name} (scancel, time limit or preemption)")


def job_info() -> dict[str, Any]:
    """Where the run executes: lets `bench status` tell a live run from one killed without a word."""
    env = os.environ
    jid = env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        # array tasks are addressed as <array>_<task> by scancel/squeue
        jid = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": jid}


def claim(rdir: Path) -> bool:
    """Atomically take the right to execute a run (``runs/<id>/.claim``, O_EXCL).

    Two jobs of one run id (a resubmitted sweep while the first is still running, or ``none``
    collapsed from several ratios) must not both execute it. A claim left by a job that is gone is
    taken over.
    """
    import json

    from bench.sweep import job_alive

    rdir.mkdir(parents=True, exist_ok=True)
    lock = rdir / ".claim"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            if holder and job_alive(holder) is False:
                lock.unlink(missing_ok=True)
                continue
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(job_info(), fh)
        return True
    return False


def release(rdir: Path) -> None:
    (rdir / ".claim").unlink(missing_ok=True)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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


# ----------------------------------------------------------------------------- passes
def accuracy_pass(cfg: dict[str, Any], adapter, method, rid: str) -> dict[str, Any]:
    """Run the benchmark through lmms-eval; returns metrics, samples and per-sample token counts."""
    from lmms_eval.evaluator import simple_evaluate

    from bench.lmms_model import TokenPruneLlava

    bcfg = cfg["benchmark"]
    task = task_data.resolve(bcfg).task  # a generated name when the data is overridden
    lm = TokenPruneLlava(adapter=adapter, method=method, batch_size=bcfg["batch_size"], seed=cfg["seed"])
    # every setting that changes answers goes into model_args: lmms-eval's response cache keys on it
    margs = {"run_id": rid, "model": cfg["model"]["name"], "method": cfg["method"]["name"], "ratio": cfg["ratio"], "seed": cfg["seed"]}
    model_args = ",".join(f"{k}={v}" for k, v in margs.items())
    results = simple_evaluate(
        model=lm,
        model_args=model_args,
        tasks=[task],
        limit=bcfg.get("limit"),
        batch_size=bcfg["batch_size"],
        task_manager=task_manager(bcfg),
        log_samples=True,
        use_cache=bcfg.get("use_cache"),
        bootstrap_iters=int(bcfg.get("bootstrap_iters", 100)),
        random_seed=cfg["seed"],
        numpy_random_seed=cfg["seed"],
        torch_random_seed=cfg["seed"],
        datetime_str=_dt.datetime.now().strftime("%Y%m%d_%H%M%S_%f"),  # its default is frozen at import
        verbosity="WARNING",
        process_docs_parallel=1,
    )
    if results is None or task not in results.get("results", {}):
        raise RuntimeError(f"lmms-eval returned no results for task {task!r}")
    raw = results["results"][task]
    hib = results.get("higher_is_better", {}).get(task, {})
    logged = results.get("samples", {}).get(task, [])
    metrics: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        if "," not in key:
            continue
        name, _filter = key.split(",", 1)
        if "_stderr" in name:  # lmms-eval 0.7 adds *_stderr, *_stderr_clt, *_stderr_clustered
            continue
        stderr = metric_stderr(raw, name, _filter, value, logged)
        metrics[name] = {
            "value": _num(value),
            "stderr": _num(stderr),
            "higher_is_better": bool(hib.get(name, True)),
        }
    comps = bcfg.get("metric_components")
    if comps:  # e.g. MME total = perception + cognition, the number papers report
        vals = [metrics.get(c, {}).get("value") for c in comps]
        metrics[bcfg["metric"]] = {"value": None if None in vals else float(sum(vals)), "stderr": None, "higher_is_better": True}
    if bcfg["metric"] not in metrics:
        raise RuntimeError(f"task {task!r} reported no metric {bcfg['metric']!r} (it reported {sorted(metrics)})")
    stats = {(s["task"], s["doc_id"]): s for s in lm.stats}
    samples = []
    for s in results.get("samples", {}).get(task, []):
        st = stats.get((task, s.get("doc_id")), {})
        resp = s.get("filtered_resps") or s.get("resps") or [None]
        while isinstance(resp, list) and resp:
            resp = resp[0]
        row = {"doc_id": s.get("doc_id"), "target": s.get("target"), "prediction": resp, "visual_tokens_kept": st.get("visual_tokens_kept"), "visual_tokens_layer_mean": _mean(st.get("visual_tokens_per_layer"))}
        for m in metrics:
            if m in s and not isinstance(s[m], (dict, list)):
                row[m] = s[m]
            elif m in s and isinstance(s[m], dict) and "score" in s[m]:
                row[m] = s[m]["score"]
        samples.append(row)
    split = results.get("configs", {}).get(task, {}).get("test_split")
    return {"metrics": metrics, "samples": samples, "stats": lm.stats, "lm": lm, "split": split, "task": task}


def metric_stderr(raw: dict[str, Any], name: str, filt: str, value: Any, samples: list[dict[str, Any]]) -> float | None:
    """The standard error of metric ``name``: lmms-eval's own ``<name>_stderr`` when it computed one, else its
    ``<name>_stderr_clt`` only where that is the error of this metric.

    lmms-eval computes ``*_stderr_clt`` as ``std / sqrt(n)`` of the per-document scores the metric received,
    whatever its aggregation does with them; it is the metric's standard error only when the metric is the
    mean of those scores (checked against the logged ``samples``). For other aggregations (MME's per-category
    sums, a mean over a subset of the documents) it would be some other number: null then.
    """
    own = _num(raw.get(f"{name}_stderr,{filt}"))
    if own is not None:
        return own
    clt = _num(raw.get(f"{name}_stderr_clt,{filt}"))
    val = _num(value)
    if clt is None or val is None:
        return None
    scores = []
    for s in samples:
        v = s.get(name)
        v = v.get("score") if isinstance(v, dict) else v
        if _num(v) is not None:
            scores.append(float(v))
    return clt if scores and abs(sum(scores) / len(scores) - val) <= 1e-9 * max(1.0, abs(val)) else None


def roofline(adapter, eff: dict[str, Any]) -> dict[str, Any]:
    """Measured ceilings and the LLM-prefill floor: max(FLOPs / matmul peak, weight bytes / bandwidth)."""
    from bench.measure.latency import measure_ceilings, roofline_ms

    key = str(adapter.device)
    if key not in _CEILINGS:  # measured once per process: setdefault would re-run the 8k matmul + copy each time
        _CEILINGS[key] = measure_ceilings(adapter.device, adapter.dtype)
    ceil = _CEILINGS[key]
    lm = adapter.model.model.language_model
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters()) + adapter.model.lm_head.weight.numel() * adapter.model.lm_head.weight.element_size()
    llm_flops = eff.get("flops_llm_analytic")
    return {
        "matmul_tflops_per_s": None if ceil["matmul_flops_per_s"] is None else round(ceil["matmul_flops_per_s"] / 1e12, 2),
        "copy_gb_per_s": None if ceil["copy_bytes_per_s"] is None else round(ceil["copy_bytes_per_s"] / 1e9, 1),
        "llm_weight_bytes": int(weight_bytes),
        "llm_prefill_flops": llm_flops,
        "llm_prefill_floor_ms": None if llm_flops is None else roofline_ms(llm_flops, weight_bytes, ceil),
    }


_CEILINGS: dict[str, dict[str, float]] = {}


def probe_batch(adapter, acc: dict[str, Any] | None, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """The fixed input of the efficiency pass: the benchmark's first sample, or a synthetic one.

    Synthetic: a LLaVA-1.5-shaped prompt (35 text tokens, the image, 25 text tokens; 60 text tokens
    as in methods.md's worked example) with seeded random token ids and pixels. Costs and latency do
    not depend on the values, so methods compared on it see identical work.
    """
    if acc is not None and adapter.processor is not None and acc.get("split"):
        lm = acc["lm"]
        doc = lm.task_dict[acc["task"]][acc["split"]][0]
        image = _first_image(doc)
        if image is not None:
            prompt = lm._prompt(str(doc.get("question", "What is shown in the image?")))
            return dict(adapter.processor(images=[image.convert("RGB")] * batch_size, text=[prompt] * batch_size, return_tensors="pt", padding=True))
    g = torch.Generator().manual_seed(0)
    cfg = adapter.config
    n = adapter.grid[0] * adapter.grid[1]
    vocab = cfg.text_config.vocab_size
    text = torch.randint(3, min(vocab, 32000), (60,), generator=g)
    text[text == adapter.image_token_id] = 3
    ids = torch.cat([text[:35], torch.full((n,), adapter.image_token_id), text[35:]]).unsqueeze(0).repeat(batch_size, 1)
    side = cfg.vision_config.image_size
    pix = torch.randn(1, 3, side, side, generator=g).repeat(batch_size, 1, 1, 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pix}


def _first_image(doc: Any):
    from PIL import Image

    if doc is None:
        return None
    for v in doc.values():
        if isinstance(v, Image.Image):
            return v
        if isinstance(v, dict) and isinstance(v.get("bytes"), (bytes, bytearray)):
            import io

            return Image.open(io.BytesIO(v["bytes"]))
    return None


def _mean(xs: list[float] | None) -> float | None:
    return None if not xs else round(sum(xs) / len(xs), 3)


def _num(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if f != f else f  # NaN -> null


# ----------------------------------------------------------------------------- the run
def execute(cfg: dict[str, Any], refresh: bool = True) -> dict[str, Any]:
    """Run one fully resolved config; returns the record (existing one when skipped).

    With ``verify=true`` a completed record is not skipped but re-run and compared with
    (:func:`verify_run`, which returns its report); a run with no record runs as usual.

    ``refresh=False`` leaves the leaderboard alone: a sweep executed in one process rebuilds it once
    at its end (``bench.cli``) instead of after each of its runs.
    """
    t0 = time.time()
    validate(cfg)
    canonicalize(cfg)
    method = build_method(cfg)
    adapter = build_adapter(cfg)
    adapter.check_method(method)
    fingerprints = {"model": adapter.fingerprint(), "benchmark": benchmark_fingerprint(cfg["benchmark"])}
    rid = run_id(cfg, fingerprints)
    rdir = run_dir(cfg["results_dir"], rid)
    existing = read_record(rdir / "record.json")
    if existing is not None and existing.get("status") == "completed" and not cfg.get("overwrite", False):
        if cfg.get("verify", False):
            return verify_run(cfg, adapter, method, rid, rdir, existing)
        log.info("run %s already recorded at %s; skipping (overwrite=true re-runs it)", rid, rdir)
        print(f"[bench] skip {rid}: already recorded ({rdir / 'record.json'})")
        return existing
    adapter = _loaded(cfg, adapter)  # missing/corrupt weights raise a BenchError here: nothing written yet

    started = _now()
    base = {
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
        "method_deviations": list(getattr(method, "deviations", ())),
        "config": cfg,
        "started_at": started,
    }
    if not claim(rdir):
        print(f"[bench] skip {rid}: being executed by another job ({rdir / '.claim'})")
        return existing or {"run_id": rid, "status": "running"}
    existing = read_record(rdir / "record.json")  # another job may have finished it meanwhile
    if existing is not None and existing.get("status") == "completed" and not cfg.get("overwrite", False):
        release(rdir)
        print(f"[bench] skip {rid}: already recorded ({rdir / 'record.json'})")
        return existing
    marker = existing is None or existing.get("status") != "completed"
    refused = False
    if marker:
        # a marker, so `bench status` can tell a job that died without a word (SIGKILL, OOM killer)
        write_json(rdir / "record.json", {**base, "status": "running", "metrics": {}, "accuracy_measured": False, "error": None, "job": job_info()})
    previous = signal.signal(signal.SIGTERM, _raise_killed) if threading.current_thread() is threading.main_thread() else None
    try:
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
            acc = accuracy_pass(cfg, adapter, method, rid)
        eff: dict[str, Any] = {k: None for k in ("tflops_prefill", "prefill_ms", "prefill_ms_iqr", "timer", "timing_repeats", "kv_cache_bytes", "kv_cache_bytes_per_layer", "peak_mem_bytes", "measured_batch_size")}
        eff["device"] = "cpu" if adapter.device.type == "cpu" else torch.cuda.get_device_name(adapter.device)
        if measure.get("efficiency", True):
            from bench.measure.efficiency import measure_efficiency

            batch = probe_batch(adapter, acc, batch_size=int(measure.get("batch_size", 1)))
            seeds = torch.arange(batch["input_ids"].shape[0], dtype=torch.long) + int(cfg["seed"])
            e, n2 = measure_efficiency(adapter, method, batch, seeds, warmup=int(measure.get("warmup", 1)), repeats=int(measure.get("repeats", 5)))
            eff.update(e)
            notes += n2
            notes.append(
                f"prefill_ms: median of {int(measure.get('repeats', 5))} timed repeats after {int(measure.get('warmup', 1))} warm-up run(s) "
                "and the FLOP-counting pass" + (f" (measure={measure['name']})" if measure.get("name") else "")
            )
            if adapter.device.type == "cpu":
                # thread count changes CPU latency, never predictions (checked: samples identical at 1 and 2)
                notes.append(f"CPU timings with {torch.get_num_threads()} torch intra-op thread(s)")
            if measure.get("stages", False):
                from bench.measure.latency import stage_latencies

                lat, n3 = stage_latencies(adapter, method, batch, seeds, warmup=int(measure.get("warmup", 1)), repeats=int(measure.get("repeats", 5)), modes=tuple(measure.get("modes", ["eager"])))
                eff["latency"] = lat
                eff["roofline"] = roofline(adapter, eff)
                notes += n3
        else:
            notes.append("efficiency not measured: measure.efficiency=false")
        n_vis = adapter.grid[0] * adapter.grid[1]
        if acc is not None and acc["stats"]:
            st = acc["stats"]
            kept = sum(s["visual_tokens_kept"] for s in st) / len(st)
            per_layer = [sum(col) / len(st) for col in zip(*(s["visual_tokens_per_layer"] for s in st))]
        else:
            kept = eff.get("measured_visual_tokens_kept")
            per_layer = eff.get("measured_visual_tokens_per_layer")
        eff.pop("measured_visual_tokens_kept", None)
        eff.pop("measured_visual_tokens_per_layer", None)
        eff["visual_tokens_in"] = n_vis
        eff["visual_tokens_kept"] = kept
        eff["visual_tokens_per_layer"] = [round(x, 3) for x in per_layer] if per_layer else None
        eff["visual_tokens_layer_mean"] = round(sum(per_layer) / len(per_layer), 3) if per_layer else None
        eff.update(method.budget_fields(n_vis, adapter.num_llm_layers, kept, per_layer))  # budget_mode, budget_met, ...
        record = {
            **base,
            "status": "completed",
            "accuracy_measured": acc is not None,
            "n_samples": len(acc["samples"]) if acc else None,
            "metrics": acc["metrics"] if acc else {},
            "efficiency": eff,
            "provenance": provenance(cfg, adapter, fingerprints, acc["lm"].batch_size if acc else None),
            "notes": notes,
            "error": None,
            "finished_at": _now(),
            "wall_s": round(time.time() - t0, 2),
        }
        if acc is not None:
            write_jsonl(rdir / "samples.jsonl", acc["samples"])
        write_yaml(rdir / "config.yaml", cfg)
        write_json(rdir / "record.json", record)
    except BenchError:
        # refused with a reason (e.g. ToMe cannot reach the budget in this tower): as for bad input,
        # nothing stays behind, so undo the running marker
        refused = True
        if marker:
            if existing is None:
                (rdir / "record.json").unlink(missing_ok=True)
            else:
                write_json(rdir / "record.json", existing)
        raise
    except (Exception, RunKilled) as e:
        if existing is not None and existing.get("status") == "completed":
            log.error("run %s failed; the completed record at %s is kept", rid, rdir)
        else:
            failed = {**base, "status": "failed", "metrics": {}, "accuracy_measured": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(), "job": job_info(), "finished_at": _now(), "wall_s": round(time.time() - t0, 2)}
            try:
                write_json(rdir / "record.json", failed)
            except OSError:
                log.exception("could not write the failed record")
            _sink(failed, cfg)
        raise
    finally:
        release(rdir)
        if refused and existing is None:
            for d in (rdir, rdir.parent):  # runs/<id>, then runs/, each only if empty
                try:
                    d.rmdir()
                except OSError:
                    break
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    _sink(record, cfg)
    if refresh:
        refresh_leaderboard(cfg["results_dir"])
    else:
        PENDING_REFRESH.add(str(cfg["results_dir"]))
    _print_summary(record, rdir)
    return record


#: runs whose re-run under ``verify=true`` did not reproduce their record: one line each, for the CLI
VERIFY_MISMATCHES: list[str] = []


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The per-document rows of a record's ``samples.jsonl``; a missing or unreadable file is an error."""
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise CorruptFileError(f"{path} is missing: the record cannot be verified without its per-document predictions") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path} cannot be read ({e}); re-run with overwrite=true to record it again") from None


def verify_run(cfg: dict[str, Any], adapter, method, rid: str, rdir: Path, existing: dict[str, Any]) -> dict[str, Any]:
    """Re-run a completed record's benchmark and compare the answers with it (``verify=true``).

    Every document's prediction and the value of every recorded metric must come out identical;
    lmms-eval's response cache is bypassed so that the model really answers again. Efficiency is not
    compared: timings measure the machine, not the result. Nothing is written: the record, its samples
    and the leaderboard stay as they are. Returns a report dict (``reproduced``: bool, or None when the
    record has no answers to compare); a mismatch is also added to :data:`VERIFY_MISMATCHES`.
    """
    if not existing.get("accuracy_measured"):
        why = next((n for n in existing.get("notes") or [] if n.startswith("accuracy not measured")), "accuracy not measured")
        print(f"[bench] verify {rid}: nothing to compare ({why})")
        return {"run_id": rid, "reproduced": None, "reason": why}
    recorded = read_samples(rdir / "samples.jsonl")
    adapter = _loaded(cfg, adapter)
    t0 = time.time()
    fresh_cfg = {**cfg, "benchmark": {**cfg["benchmark"], "use_cache": None}}
    acc = accuracy_pass(fresh_cfg, adapter, method, rid)
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
    if ok:
        print(head + f"reproduced: {len(new)}/{len(old)} answers identical, {pm}={metrics.get(pm, {}).get('now')} as recorded ({time.time() - t0:.0f} s)")
    else:
        shown = ", ".join(map(str, differ[:8])) + (" ..." if len(differ) > 8 else "")
        parts = [f"{len(differ)} of {len(old)} answers differ" + (f" (documents {shown})" if differ else "")]
        parts += [f"{k}: recorded {metrics[k]['recorded']}, now {metrics[k]['now']}" for k in changed]
        line = "; ".join(parts)
        print(head + "NOT reproduced: " + line)
        env_diff = environment_difference(existing)
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
        VERIFY_MISMATCHES.append(f"{rid}: {line}")
    return {"run_id": rid, "reproduced": ok, "answers": len(old), "differ": differ, "metrics": metrics,
            "environment_differs": None if ok else environment_difference(existing)}


def environment_difference(record: dict[str, Any]) -> list[str] | None:
    """``name: recorded -> installed`` per differing distribution; None if the record lists none."""
    recorded = (record.get("provenance") or {}).get("distributions")
    if not isinstance(recorded, dict):
        return None
    return environment.compare(recorded, environment.installed())


def _sink(record: dict[str, Any], cfg: dict[str, Any]) -> None:
    """Send a record to the configured experiment logger (W&B); never raises."""
    from bench.wandb_sink import log_run

    log_run(record, cfg.get("logger") or {})


#: results dirs that got a record from ``execute(..., refresh=False)`` and await one leaderboard refresh
PENDING_REFRESH: set[str] = set()


def refresh_leaderboard(results_dir: str) -> None:
    from bench.aggregate import aggregate

    try:
        # the site (kept-token pictures: a minute of CPU on a cold cache) is built by `python -m bench
        # aggregate` and `make demo`, not after every run
        aggregate(results_dir, quiet=True, site=False)
    except Exception:  # noqa: BLE001 - the record is safe; `python -m bench aggregate` can redo this
        log.exception("leaderboard refresh failed; run `python -m bench aggregate`")


def _print_summary(rec: dict[str, Any], rdir: Path) -> None:
    m = rec["metrics"].get(rec["primary_metric"], {}).get("value") if rec["metrics"] else None
    e = rec["efficiency"]
    parts = [
        f"run {rec['run_id']}",
        f"{rec['model']} / {rec['method']} / ratio={rec['ratio']} / {rec['benchmark']}",
        f"{rec['primary_metric']}={m:.4f}" if m is not None else "accuracy=n/a",
        f"visual tokens {e['visual_tokens_kept']:.1f}/{e['visual_tokens_in']}" if e.get("visual_tokens_kept") is not None else "",
        f"TFLOPs={e['tflops_prefill']:.4f}" if e.get("tflops_prefill") is not None else "",
        f"prefill={e['prefill_ms']:.1f} ms ({e['timer']})" if e.get("prefill_ms") is not None else "",
        f"{rec['wall_s']} s",
    ]
    print("[bench] " + " | ".join(p for p in parts if p))
    print(f"[bench] record: {rdir / 'record.json'}")
