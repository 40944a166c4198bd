"""Latency that users can trust: fixed inputs, warm-up, CUDA events, many repeats, median + spread.

Stages are timed separately on the same inputs (vision encoder, method selection, LLM prefill,
one decode step), in two modes:

* ``eager``: the model's ordinary forward (what an evaluation run executes);
* ``graph``: the LLM prefill captured once in a CUDA graph and replayed, which removes the per-kernel
  launch overhead that dominates batch-1 prefill on an H100 (gpu.md). The captured forward runs
  with ``use_cache=False`` (static memory), so it excludes writing the KV cache; the record says so.

The roofline floor of a prefill is ``max(FLOPs / matmul peak, weight bytes / copy bandwidth)`` with
both ceilings measured in the same process (:func:`measure_ceilings`). On CPU the same code runs
with ``perf_counter`` (labelled ``wall_clock``) and graph mode is unavailable (null, with a note).
"""

from __future__ import annotations

from typing import Any

import torch

from bench.measure.timing import Timing, time_fn


def measure_ceilings(device: torch.device, dtype: torch.dtype = torch.float16) -> dict[str, float]:
    """Measured dense matmul peak (FLOP/s) and device-copy bandwidth (bytes/s, read + write)."""
    if device.type != "cuda":
        return {"matmul_flops_per_s": None, "copy_bytes_per_s": None}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, warmup=3, repeats=20)
    peak = 2 * n**3 / (t.median_ms / 1e3)
    x = torch.empty(512 * 2**20, device=device, dtype=torch.uint8)  # 512 MiB, far beyond L2
    y = torch.empty_like(x)
    t = time_fn(lambda: y.copy_(x), device, warmup=3, repeats=20)
    bw = 2 * x.numel() / (t.median_ms / 1e3)
    del a, b, x, y
    return {"matmul_flops_per_s": peak, "copy_bytes_per_s": bw}


def roofline_ms(flops: float, bytes_moved: float, ceilings: dict[str, float]) -> float | None:
    if not ceilings.get("matmul_flops_per_s"):
        return None
    return 1e3 * max(flops / ceilings["matmul_flops_per_s"], bytes_moved / ceilings["copy_bytes_per_s"])


def _t(t: Timing | None) -> dict[str, Any]:
    if t is None:
        return {"median_ms": None, "iqr_ms": None}
    return {"median_ms": round(t.median_ms, 4), "iqr_ms": round(t.iqr_ms, 4)}


class GraphPrefill:
    """The LLM prefill of fixed-shape inputs captured in a CUDA graph (no KV cache written)."""

    def __init__(self, adapter, prepared, method, warmup: int = 3):
        self.adapter = adapter
        lm = adapter.model
        self.embeds = prepared.inputs_embeds.clone()
        self.mask = prepared.attention_mask.clone()
        self.pos = (self.mask.long().cumsum(-1) - 1).clamp(min=0)

        def fwd():
            return lm(inputs_embeds=self.embeds, attention_mask=self.mask, position_ids=self.pos, use_cache=False, logits_to_keep=1).logits

        self.fwd = fwd
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # in-LLM hooks run (as GPU kernels) during capture; replays re-execute those kernels, so the
        # hooks need not stay installed afterwards
        with adapter.llm_pruning(method, prepared), torch.cuda.stream(stream):
            for _ in range(warmup):
                fwd()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = fwd()

    def replay(self):
        self.graph.replay()
        return self.out


@torch.no_grad()
def stage_latencies(adapter, method, batch: dict[str, torch.Tensor], seeds: torch.Tensor, warmup: int = 3, repeats: int = 20, modes: tuple[str, ...] = ("eager", "graph")) -> tuple[dict[str, Any], list[str]]:
    """Time vision encoder, selection, LLM prefill (eager and graph) and one decode step."""
    device = adapter.device
    notes: list[str] = []
    pix = batch["pixel_values"].to(device, adapter.dtype)
    out: dict[str, Any] = {}
    out["vision_encoder"] = _t(time_fn(lambda: adapter.encode_images(pix), device, warmup, repeats))
    # selection alone, given the tower's outputs (ToMe merges inside the tower: timed as part of it)
    if method.stage == "pre_llm":
        needs = bool(method.needs)
        enc = adapter.encode_images(pix, output_hidden_states=needs)
        feats, hidden = enc if needs else (enc, None)
        ctx = adapter.vision_context(seeds, hidden, method.needs)
        out["selection"] = _t(time_fn(lambda: method.reduce(feats, ctx), device, warmup, repeats))
    else:
        out["selection"] = _t(None)
        notes.append(f"selection of a {method.stage} method is timed inside its stage (vision tower or LLM prefill)")
    prepared = adapter.prepare(batch, method, seeds)
    if "eager" in modes:
        out["prefill_eager"] = _t(time_fn(lambda: adapter.prefill(prepared, method), device, warmup, repeats))
    if "graph" in modes:
        if device.type != "cuda":
            out["prefill_graph"] = _t(None)
            notes.append("prefill_graph is null: CUDA graphs need a GPU")
        else:
            try:
                g = GraphPrefill(adapter, prepared, method)
                out["prefill_graph"] = _t(time_fn(g.replay, device, warmup, repeats))
                del g
            except Exception as e:  # noqa: BLE001 - a method whose hooks sync with the host cannot be captured
                out["prefill_graph"] = _t(None)
                notes.append(f"prefill_graph is null: capture failed ({type(e).__name__}: {str(e)[:160]})")
    # decode steps after the (pruned) prefill, with the KV cache; in-LLM hooks stay installed so
    # every step attends over exactly the pruned prefix. Steps advance like generation does (each
    # one a new position), warm-up steps first; the median step is reported.
    with adapter.llm_pruning(method, prepared):
        first = adapter.prefill(prepared)
        cache = first.past_key_values
        tok = first.logits[:, -1:].argmax(-1)
        mask = prepared.attention_mask
        pos = mask.long().sum(-1, keepdim=True) - 1
        times: list[float] = []
        try:
            for step in range(warmup + repeats):
                mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
                pos = pos + 1
                t = time_fn(lambda: adapter.model(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True), device, warmup=0, repeats=1)
                if step >= warmup:
                    times.append(t.median_ms)
            import statistics

            q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
            out["decode_step"] = {"median_ms": round(statistics.median(times), 4), "iqr_ms": round(q[2] - q[0], 4)}
        except Exception as e:  # noqa: BLE001
            out["decode_step"] = _t(None)
            notes.append(f"decode_step is null: {type(e).__name__}: {str(e)[:160]}")
    return out, notes

