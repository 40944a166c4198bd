"""The accuracy pass: the benchmark through lmms-eval, and what a record keeps of lmms-eval's output.

lmms-eval is used as a library: ``simple_evaluate`` gets a ready instance of the project's model
(:class:`bench.lmms_model.TokenPruneLlava`, the adapter plus the method) and the task; its results are
parsed into the record's ``metrics`` and the per-document rows of ``samples.jsonl``.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from bench import task_data


def task_manager(bcfg: dict[str, Any]):
    """lmms-eval's task index for the benchmark's task (``bench.task_data``: SynthVQA's task directory,
    an override task for local data, or the built-in tasks)."""
    return task_data.task_manager(task_data.resolve(bcfg))


def accuracy_pass(cfg: dict[str, Any], adapter, method, rid: str) -> dict[str, Any]:
    """Run the benchmark through lmms-eval.

    Returns ``metrics`` (:func:`parse_metrics`), ``samples`` (:func:`parse_samples`), ``stats`` (the
    model's per-sample token counts), ``lm`` (the lmms-eval model, holding the task's documents),
    ``split`` and ``task``.
    """
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
    metrics = parse_metrics(results, task, bcfg)
    samples = parse_samples(results, task, metrics, lm.stats)
    split = results.get("configs", {}).get(task, {}).get("test_split")
    return {"metrics": metrics, "samples": samples, "stats": lm.stats, "lm": lm, "split": split, "task": task}


def parse_metrics(results: dict[str, Any], task: str, bcfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The record's ``metrics`` from ``simple_evaluate``'s results: ``{name: {value, stderr, higher_is_better}}``.

    lmms-eval keys each value ``"<metric>,<filter>"``; its stderr variants are folded into ``stderr``.
    ``bcfg["metric_components"]`` adds ``bcfg["metric"]`` as their sum (MME). A task that reports no
    ``bcfg["metric"]`` is an error.
    """
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
    return metrics


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


def parse_samples(results: dict[str, Any], task: str, metrics: dict[str, Any], stats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per document for ``samples.jsonl``: doc_id, target, prediction, the visual tokens the
    model kept for it (``stats``, by doc_id) and its per-document metric values."""
    by_doc = {(s["task"], s["doc_id"]): s for s in stats}
    samples = []
    for s in results.get("samples", {}).get(task, []):
        st = by_doc.get((task, s.get("doc_id")), {})
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
    return samples


def _mean(xs: list[float] | None) -> float | None:
    return None if not xs else round(sum(xs) / len(xs), 3)


def _num(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if f != f else f  # NaN -> null
