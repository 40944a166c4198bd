"""The efficiency pass of a run: one fixed sample, measured apart from the accuracy pass.

What is measured and how (the record's ``efficiency`` keys, see ``bench/schema.py``):

* ``tflops_prefill``: FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
  convolutions and attention; 2 x multiply-adds) over the vision encoder, the method's selection and
  the LLM prefill, per sample, / 1e12. Elementwise work (norms, softmax, activations) is not counted.
  ``tflops_prefill_analytic_no_selection`` is ``bench.measure.flops``'s model of the same forward
  without the selection, and ``tflops_prefill_paper_convention`` FastV's formula (LLM only).
* ``prefill_ms``: median (and IQR) over repeats, after warm-up, of the same region.
* ``kv_cache_bytes``: summed from the K/V tensors of the cache right after that prefill.
* ``peak_mem_bytes``: ``torch.cuda.max_memory_allocated`` across the pass (CUDA only).
"""

from __future__ import annotations

from typing import Any

import torch

from bench.measure.flops import analytic_prefill, counter, paper_convention
from bench.measure.timing import time_fn
from bench.models.llava import kv_cache_bytes


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

    with counter() as c:
        prepared, out = step()
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
    # analytic model per sample (its own text length and per-layer visual tokens), summed over the batch
    text = [int(prepared.attention_mask[i].sum()) - int(prepared.visual_tokens_kept[i]) for i in range(bsz)]
    analytic = [analytic_prefill(cfg, text[i], rows[i]) for i in range(bsz)]
    paper = sum(paper_convention(cfg, text[i], rows[i]) for i in range(bsz))
    eff = {
        "tflops_prefill": flops / bsz / 1e12,
        "tflops_prefill_analytic_no_selection": sum(a.total for a in analytic) / bsz / 1e12,
        "tflops_prefill_paper_convention": paper / bsz / 1e12,
        "flops_llm_analytic": sum(a.llm + a.lm_head for a in analytic),
        "prefill_ms": timing.median_ms,
        "prefill_ms_iqr": timing.iqr_ms,
        "timer": timing.timer,
        "timing_repeats": timing.repeats,
        "kv_cache_bytes": int(sum(kv_layers)),
        "kv_cache_bytes_per_layer": [int(x) for x in kv_layers],
        "peak_mem_bytes": peak,
        "device": device_name(device),
        "measured_batch_size": int(batch["input_ids"].shape[0]),
        "measured_visual_tokens_kept": kept,
        "measured_visual_tokens_per_layer": per_layer,
    }
    return eff, notes
