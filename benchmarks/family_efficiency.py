"""Prefill efficiency of the LLaVA-NeXT and Qwen2.5-VL adapters with random weights at real shapes (GPU).

One CSV per family under ``--out`` (default ``$OUT``): per (image size, method, ratio) the visual tokens in
and kept, the measured prefill time of the LLM (median and IQR of ``--repeats`` CUDA-event timings after
``--warmup``), the prepare time (vision tower + selection + embeddings), KV-cache bytes, peak memory, the
LLM's analytic prefill FLOPs (from the adapter's ``flops_description``: projections with grouped-query
K/V, causal attention counted as the full ``T x T`` scores and values, SwiGLU MLP, ``lm_head`` on one
position) and the roofline floor ``max(FLOPs / measured matmul peak, LLM weight bytes / measured copy
bandwidth)`` (``bench.measure.latency.measure_ceilings``).

    python benchmarks/family_efficiency.py --out $OUT            # llava_next_7b at 672x672, qwen25vl_7b at 448 and 1008
    python benchmarks/family_efficiency.py --models qwen25vl_3b --ratios 0 0.5 --out /tmp/x

Random weights: costs and latency do not depend on weight values; no accuracy is measured.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"llava_next_7b": [(672, 672)], "llava_next_mistral_7b": [(672, 672)], "qwen25vl_7b": [(448, 448), (1008, 1008)], "qwen25vl_3b": [(448, 448), (1008, 1008)]}


def build(model: str, device: str, dtype: str):
    from hydra.utils import get_class

    cfg = yaml.safe_load((ROOT / "conf" / "model" / f"{model}.yaml").read_text())
    cfg.update(device=device, weights="random", dtype=dtype)
    return get_class(cfg.pop("_target_"))(**cfg).load()


def llm_flops(desc, t: int, batch: int) -> int:
    d, hd = desc.llm_width, desc.llm_head_dim
    proj = 2 * t * d * hd * (2 * desc.llm_heads + 2 * desc.llm_kv_heads)
    attn = 2 * 2 * t * t * desc.llm_heads * hd
    mlp = 2 * 3 * t * d * desc.llm_mlp
    return batch * (desc.llm_layers * (proj + attn + mlp) + 2 * d * desc.vocab)


def probe(adapter, size, batch):
    if adapter.family == "qwen25vl":
        return adapter.probe_batch(batch_size=batch, size=size)
    adapter.PROBE_IMAGE = size
    return adapter.probe_batch(batch_size=batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llava_next_7b", "qwen25vl_7b"])
    ap.add_argument("--methods", nargs="+", default=["none", "random", "divprune"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.778, 0.889])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--out", default=os.environ.get("OUT", "results/efficiency"))
    args = ap.parse_args()

    from bench.measure.latency import measure_ceilings, roofline_ms
    from bench.measure.timing import time_fn
    from methods.registry import create

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        adapter = build(model, args.device, args.dtype)
        dev = adapter.device
        ceil = measure_ceilings(dev, adapter.dtype)
        weight_bytes = adapter.llm_weight_bytes()
        desc = adapter.flops_description()
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        rows = []
        for size in SIZES[model]:
            batch = probe(adapter, size, args.batch)
            seeds = torch.arange(args.batch)
            for method in args.methods:
                for ratio in ([0.0] if method == "none" else args.ratios):
                    m = create(method, ratio)
                    adapter.check_method(m)
                    prep = time_fn(lambda: adapter.prepare(batch, m, seeds), dev, warmup=args.warmup, repeats=args.repeats)
                    prepared = adapter.prepare(batch, m, seeds)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                        torch.cuda.reset_peak_memory_stats(dev)
                    out_ = adapter.prefill(prepared)
                    kv = sum(adapter.kv_cache_bytes(out_.past_key_values))
                    del out_
                    timing = time_fn(lambda: adapter.prefill(prepared), dev, warmup=args.warmup, repeats=args.repeats)
                    t = int(prepared.attention_mask.shape[1])
                    flops = llm_flops(desc, t, args.batch)
                    rows.append({
                        "model": model, "device": name, "dtype": args.dtype, "image_h": size[0], "image_w": size[1], "method": method,
                        "ratio": ratio, "batch": args.batch, "budget": getattr(adapter, "budget", ""),
                        "visual_tokens_in": prepared.visual_tokens_in[0], "visual_tokens_kept": prepared.visual_tokens_kept[0],
                        "seq_len": t, "prefill_ms": round(timing.median_ms, 3), "prefill_ms_iqr": round(timing.iqr_ms, 3),
                        "prepare_ms": round(prep.median_ms, 3), "kv_cache_bytes": kv,
                        "peak_mem_bytes": int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else "",
                        "llm_prefill_flops_analytic": flops, "llm_weight_bytes": weight_bytes,
                        "llm_prefill_floor_ms": roofline_ms(flops, weight_bytes, ceil),
                    })
                    print(rows[-1], flush=True)
        path = out / f"{model}_{name.split()[-1].lower() if dev.type == 'cuda' else 'cpu'}.csv"
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print("wrote", path)
        del adapter
        if dev.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
