"""The efficiency pass of a run: one fixed sample, measured apart from the accuracy pass.

What is measured and how (the record's ``efficiency`` keys, see ``bench/schema.py``):

* ``tflops_prefill``: FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
  convolutions and attention; 2 x multiply-adds) over the vision encoder, the method's selection and
  the LLM prefill, per sample, / 1e12. Elementwise work (norms, softmax, activations) is not counted.
  ``tflops_prefill_analytic`` is ``bench.measure.flops``'s model of the same forward (the method's
  own scoring/selection matrix products included; ``tests/test_flops.py`` checks it against the
  counter for every method), ``tflops_selection_analytic`` that selection part alone,
  ``tflops_prefill_analytic_no_selection`` the rest, and ``tflops_prefill_paper_convention`` FastV's
  formula in the papers' units (multiply-adds, LLM only) for the sample's own prompt length
  (``paper_convention_text_tokens``).
* ``prefill_ms``: median (and IQR) over repeats, after warm-up, of the same region.
* ``kv_cache_bytes``: summed from the K/V tensors of the cache right after that prefill.
* ``peak_mem_bytes``: ``torch.cuda.max_memory_allocated`` across the pass (CUDA only).
* with ``measure.stages``: ``latency`` per stage (``bench.measure.latency``) and the ``roofline``.

:func:`efficiency_pass` runs it as the ``measure`` config asks; :func:`measure_efficiency` measures.
"""

from __future__ import annotations

import os

from typing import Any

import torch

from bench.measure.flops import (
    NoSelectionFormula,
    analytic_adapter,
    counter,
    paper_convention,
)
from bench.measure.latency import roofline, stage_latencies
from bench.measure.probe import probe_batch
from bench.measure.timing import time_fn
from bench.models.llava import kv_cache_bytes


#: the efficiency keys of a record, null until measured (``measure.efficiency=false`` leaves them so)
NULL_EFFICIENCY = ("tflops_prefill", "prefill_ms", "prefill_ms_iqr", "host_load", "timer", "timing_repeats", "kv_cache_bytes", "kv_cache_bytes_per_layer", "peak_mem_bytes", "measured_batch_size")


def efficiency_pass(measure: dict[str, Any], adapter, method, acc: dict[str, Any] | None, seed: int) -> tuple[dict[str, Any], list[str]]:
    """The efficiency pass of a run, as its ``measure`` config asks; returns ``(efficiency, notes)``.

    ``acc``: the accuracy pass (``bench.evaluate.accuracy_pass``) or None; its first document is the
    measured input when it has one (:func:`~bench.measure.probe.probe_batch`). ``seed``: the run seed;
    sample ``i`` of the measured batch gets seed ``seed + i``. The result still holds
    ``measured_visual_tokens_kept`` / ``measured_visual_tokens_per_layer`` for the caller to fold in.
    """
    notes: list[str] = []
    eff: dict[str, Any] = {k: None for k in NULL_EFFICIENCY}
    eff["device"] = "cpu" if adapter.device.type == "cpu" else torch.cuda.get_device_name(adapter.device)
    if not measure.get("efficiency", True):
        return eff, ["efficiency not measured: measure.efficiency=false"]
    warmup, repeats = int(measure.get("warmup", 1)), int(measure.get("repeats", 5))
    batch = probe_batch(adapter, acc, batch_size=int(measure.get("batch_size", 1)))
    seeds = torch.arange(batch["input_ids"].shape[0], dtype=torch.long) + int(seed)
    e, n2 = measure_efficiency(adapter, method, batch, seeds, warmup=warmup, repeats=repeats)
    eff.update(e)
    notes += n2
    notes.append(
        f"prefill_ms: median of {repeats} timed repeats after {warmup} warm-up run(s) "
        "and the FLOP-counting pass" + (f" (measure={measure['name']})" if measure.get("name") else "")
    )
    if adapter.device.type == "cpu":
        # thread count changes CPU latency, never predictions (checked: samples identical at 1 and 2)
        notes.append(f"CPU timings with {torch.get_num_threads()} torch intra-op thread(s)")
        eff["host_load"] = host_load()
        load = "unknown" if eff["host_load"] is None else f"{eff['host_load']:.2f} per core (1-minute load average over {os.cpu_count()} core(s))"
        notes.append(f"prefill_ms is indicative on CPU: wall clock on a shared host, host load {load} while measuring, "
                     f"spread (IQR) {eff['prefill_ms_iqr']:.1f} ms; other processes move it, not the FLOPs")
    if measure.get("stages", False):
        lat, n3 = stage_latencies(adapter, method, batch, seeds, warmup=warmup, repeats=repeats, modes=tuple(measure.get("modes", ["eager"])))
        eff["latency"] = lat
        eff["roofline"] = roofline(adapter, eff)
        notes += n3
    return eff, notes


def host_load() -> float | None:
    """The 1-minute load average per CPU core (``os.getloadavg``), rounded to 0.01; None where the OS has none.
    Above about 1, processes queued for the cores and CPU wall-clock timings stretch."""
    try:
        return round(os.getloadavg()[0] / (os.cpu_count() or 1), 2)
    except (AttributeError, OSError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


@torch.no_grad()
def measure_efficiency(adapter, method, batch: dict[str, torch.Tensor], seeds: torch.Tensor, warmup: int = 1, repeats: int = 5) -> tuple[dict[str, Any], list[str]]:
    """Measure one processed batch (normally a single sample); returns ``(efficiency, notes)``."""
    device = adapter.device
    notes: list[str] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        prepared = adapter.prepare(batch, method, seeds)
        return prepared, adapter.prefill(prepared, method)

    # counted eagerly: a CUDA-graph replay of the selection (``adapter.selection_graphs``) runs its
    # kernels without dispatching them, so the counter would miss them (or count the capture's warm-up)
    had_own = "selection_graphs" in vars(adapter)
    own = vars(adapter).get("selection_graphs")
    adapter.selection_graphs = False
    try:
        with counter() as c:
            prepared, out = step()
    finally:
        if had_own:
            adapter.selection_graphs = own
        else:
            del adapter.selection_graphs
    flops = c.get_total_flops()
    kv_layers = kv_cache_bytes(out.past_key_values)
    del out
    timing = time_fn(step, device, warmup=warmup, repeats=repeats)
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    if peak is None:
        notes.append("peak_mem_bytes is null: peak device memory is only measured on CUDA")
    if device.type != "cuda":
        notes.append("prefill_ms is CPU wall-clock time (time.perf_counter), not comparable with GPU numbers")
    bsz = len(prepared.visual_tokens_kept)
    kept = float(sum(prepared.visual_tokens_kept)) / bsz
    rows = prepared.visual_tokens_per_layer(adapter.num_llm_layers)
    per_layer = [sum(col) / bsz for col in zip(*rows)]
    cfg = adapter.model.config
    # the analytic model of the batch as run (rows at the padded length), per sample below
    try:
        analytic = analytic_adapter(adapter, method, prepared, batch)
        selection = analytic.selection
    except NoSelectionFormula as e:
        analytic, selection = analytic_adapter(adapter, method, prepared, batch, with_selection=False), None
        notes.append(f"tflops_prefill_analytic and tflops_selection_analytic are null: {e}")
    # the papers' convention per sample on its own (unpadded) text length
    text = [int(prepared.attention_mask[i].sum()) - int(prepared.visual_tokens_kept[i]) for i in range(bsz)]
    paper = sum(paper_convention(cfg, text[i], rows[i]) for i in range(bsz))
    no_selection = analytic.total - analytic.selection
    eff = {
        "tflops_prefill": flops / bsz / 1e12,
        "tflops_prefill_analytic": None if selection is None else analytic.total / bsz / 1e12,
        "tflops_selection_analytic": None if selection is None else selection / bsz / 1e12,
        "tflops_prefill_analytic_no_selection": no_selection / bsz / 1e12,
        "tflops_prefill_paper_convention": paper / bsz / 1e12,
        "paper_convention_text_tokens": sum(text) / bsz,
        "flops_llm_analytic": analytic.llm + analytic.lm_head,
        "prefill_ms": timing.median_ms,
        "prefill_ms_iqr": timing.iqr_ms,
        "timer": timing.timer,
        "timing_repeats": timing.repeats,
        "kv_cache_bytes": int(sum(kv_layers)),
        "kv_cache_bytes_per_layer": [int(x) for x in kv_layers],
        "peak_mem_bytes": peak,
        "device": device_name(device),
        "measured_batch_size": int(batch["input_ids"].shape[0]),
        "measured_visual_tokens_in": float(sum(prepared.visual_tokens_in)) / bsz,
        "measured_visual_tokens_kept": kept,
        "measured_visual_tokens_per_layer": per_layer,
    }
    return eff, notes
