"""Prefill efficiency of the LLaVA-NeXT and Qwen2.5-VL adapters with random weights at real shapes (GPU).

One CSV per model under ``--out`` (default ``$OUT``), named ``<model>_<device>.csv`` like
``results/efficiency/llava15_7b_h100.csv``: per (image size, method, ratio) the visual tokens in and kept,
the measured prefill time of the LLM (median and IQR of ``--repeats`` timings after ``--warmup``: CUDA
events on GPU, wall clock on CPU), the prepare time (vision tower + selection + embeddings), KV-cache
bytes, peak memory of the prefill, the LLM's analytic prefill FLOPs (``bench.measure.flops.llm_prefill_flops``, from the
adapter's ``flops_description``: projections with grouped-query K/V, causal attention counted as the full
``T x T`` scores and values, SwiGLU MLP, ``lm_head`` on one position) and the roofline floor
``max(FLOPs / measured matmul peak, LLM weight bytes / measured copy bandwidth)``
(``bench.measure.latency.measure_ceilings``; CUDA only, empty on CPU where no ceiling is measured).

    python benchmarks/family_efficiency.py --out $OUT            # llava_next_7b at 672x672, qwen25vl_7b at 448 and 1008
    python benchmarks/family_efficiency.py --models qwen25vl_3b --ratios 0 0.5 --out /tmp/x
    python benchmarks/family_efficiency.py --tiny --device cpu --out /tmp/x   # smoke: tiny random configs, seconds
    python benchmarks/family_efficiency.py --models llava_next_7b --methods none fastv pdrop sparsevlm dart transprune --out $OUT

In-LLM methods prune inside the timed prefill; ``visual_tokens_layer_mean`` is the mean over the LLM's layers of the
visual tokens each one runs on, and the analytic FLOPs count each layer at its own length.

``--tiny`` runs the same code on ``conf/model/tiny_llava_next_random.yaml`` and ``tiny_qwen25vl_random.yaml``
(toy sizes, every family code path: anyres tiles + newlines, windowed tower + 2x2 merger + M-RoPE) with one
warm-up and two repeats, so a GPU run can be smoke-tested in seconds; its numbers mean nothing.

Random weights: costs and latency do not depend on weight values; no accuracy is measured.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the harness is importable
    sys.path.insert(0, str(ROOT))

from bench.measure.gpu_csv import device_tag, read_rows, rows_to_keep, write_rows

#: image sizes (H, W) in pixels measured per model
SIZES = {
    "llava_next_7b": [(672, 672)],
    "llava_next_mistral_7b": [(672, 672)],
    "qwen25vl_7b": [(448, 448), (1008, 1008)],
    "qwen25vl_3b": [(448, 448), (1008, 1008)],
    # --tiny: twice the 56 px tile (2 x 2 anyres crops + base, unpadded, newlines); Qwen 2 x 2 and 4 x 3 merged tokens
    "tiny_llava_next_random": [(112, 112), (100, 60)],
    "tiny_qwen25vl_random": [(56, 56), (112, 84)],
}
DEFAULT_MODELS = ["llava_next_7b", "qwen25vl_7b"]
TINY_MODELS = ["tiny_llava_next_random", "tiny_qwen25vl_random"]


def build(model: str, device: str, dtype: str, budget: str | None = None):
    """The model's adapter from ``conf/model/<model>.yaml`` with ``weights=random``, loaded."""
    from hydra.utils import get_class

    path = ROOT / "conf" / "model" / f"{model}.yaml"
    if not path.is_file():
        raise SystemExit(f"unknown model {model!r}: no {path.relative_to(ROOT)}")
    cfg = yaml.safe_load(path.read_text())
    cfg.update(device=device, weights="random", dtype=dtype)
    if budget:  # LLaVA-NeXT's budget convention (image | tile | base_grid): per-tile ports run under budget=tile
        cfg["budget"] = budget
    return get_class(cfg.pop("_target_"))(**cfg).load()


KEY = ("model", "image_h", "image_w", "method", "ratio", "batch", "budget")


def write_csv(path: Path, rows: list[dict], merge: Path | None = None) -> None:
    """All rows so far, plus those of ``merge`` (an earlier CSV of this model) not re-measured here, replacing
    the file atomically (a reader never sees half a table). Rows timed on another device are never mixed in
    (``bench.measure.gpu_csv.rows_to_keep``: exit 2, nothing written)."""
    if merge is not None and merge.is_file():
        old = read_rows(merge)
        rows = [old[i] for i in rows_to_keep(rows, old, key=KEY, device="device", source=f"--merge {merge}")] + rows
    write_rows(path, rows, fieldnames=list(rows[-1]))


def measure_model(model: str, args) -> tuple[Path, list[dict]]:
    """Every (size, method, ratio) of one model; writes and returns its CSV."""
    import transformers

    from bench.measure.flops import llm_prefill_flops
    from bench.measure.latency import measure_ceilings, roofline_ms
    from bench.measure.timing import time_fn
    from bench.errors import BenchError
    from methods.registry import create

    adapter = build(model, args.device, args.dtype, args.budget)
    dev = adapter.device
    ceil = measure_ceilings(dev, adapter.dtype)
    weight_bytes = adapter.llm_weight_bytes()
    desc = adapter.flops_description()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{model}_{device_tag(name)}.csv"
    rows = []
    for size in SIZES[model]:
        batch = adapter.probe_batch(batch_size=args.batch, size=size)
        seeds = torch.arange(args.batch)
        for method in args.methods:
            for ratio in ([0.0] if method == "none" else args.ratios):
                m = create(method, ratio)
                try:
                    adapter.check_method(m)
                except BenchError as e:  # a method this family refuses (with its reason) is skipped, not fatal
                    print(f"skipped {model} {method} ratio={ratio}: {e}", flush=True)
                    continue
                try:
                    prep = time_fn(lambda: adapter.prepare(batch, m, seeds), dev, warmup=args.warmup, repeats=args.repeats)
                except BenchError as e:  # refused for this image (e.g. too few tokens for the method's chunks or windows)
                    print(f"skipped {model} {size} {method} ratio={ratio}: {e}", flush=True)
                    continue
                prepared = adapter.prepare(batch, m, seeds)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                out_ = adapter.prefill(prepared, m)  # in-LLM methods prune inside this prefill
                kv = sum(adapter.kv_cache_bytes(out_.past_key_values))
                del out_
                timing = time_fn(lambda: adapter.prefill(prepared, m), dev, warmup=args.warmup, repeats=args.repeats)
                t = int(prepared.attention_mask.shape[1])
                per_layer = prepared.visual_tokens_per_layer(desc.llm_layers)[0]
                kept = prepared.visual_tokens_kept[0]
                # each layer at the tokens it runs on (all of them unless an in-LLM method dropped some), lm_head once
                flops = (sum(llm_prefill_flops(desc, t - kept + int(n), args.batch, 0) // desc.llm_layers for n in per_layer)
                         + llm_prefill_flops(desc, 0, args.batch, 1))
                floor = roofline_ms(flops, weight_bytes, ceil)
                rows.append({
                    "model": model, "family": adapter.family, "device": name, "dtype": str(adapter.dtype).removeprefix("torch."),
                    "image_h": size[0], "image_w": size[1], "method": method, "ratio": ratio, "batch": args.batch,
                    "budget": getattr(adapter, "budget", ""),
                    "visual_tokens_in": prepared.visual_tokens_in[0], "visual_tokens_kept": prepared.visual_tokens_kept[0],
                    "newline_tokens": (prepared.extras.get("newline_tokens") or [""])[0],
                    "visual_tokens_layer_mean": round(sum(per_layer) / len(per_layer), 3),
                    "seq_len": t, "prefill_ms": round(timing.median_ms, 4), "prefill_ms_iqr": round(timing.iqr_ms, 4),
                    "prepare_ms": round(prep.median_ms, 4), "prepare_ms_iqr": round(prep.iqr_ms, 4), "kv_cache_bytes": kv,
                    "peak_prefill_mem_bytes": int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else "",
                    "llm_prefill_flops_analytic": flops, "llm_weight_bytes": weight_bytes,
                    "matmul_tflops_per_s": "" if ceil["matmul_flops_per_s"] is None else round(ceil["matmul_flops_per_s"] / 1e12, 2),
                    "copy_gb_per_s": "" if ceil["copy_bytes_per_s"] is None else round(ceil["copy_bytes_per_s"] / 1e9, 1),
                    "llm_prefill_floor_ms": "" if floor is None else round(floor, 4),
                    "prefill_floor_x": "" if floor is None else round(timing.median_ms / floor, 3),
                    "timer": timing.timer, "repeats": args.repeats, "torch": torch.__version__, "transformers": transformers.__version__,
                })
                print({k: rows[-1][k] for k in ("model", "image_h", "image_w", "method", "ratio", "visual_tokens_kept", "seq_len", "prefill_ms", "llm_prefill_floor_ms")}, flush=True)
                write_csv(path, rows, args.merge_dir and Path(args.merge_dir) / path.name)  # after every row: a time-boxed GPU call keeps what it measured
    print("wrote", path, flush=True)
    del adapter, batch
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return path, rows


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None, help=f"default {' '.join(DEFAULT_MODELS)} ({' '.join(TINY_MODELS)} with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="smoke mode: tiny random configs of both families, 1 warm-up, 2 repeats")
    ap.add_argument("--methods", nargs="+", default=["none", "random", "divprune"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.778, 0.889])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=None, help="default 3 (1 with --tiny)")
    ap.add_argument("--repeats", type=int, default=None, help="default 10 (2 with --tiny)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--out", default=os.environ.get("OUT", "results/efficiency"))
    ap.add_argument("--budget", default=None, help="model.budget for every model (LLaVA-NeXT: image | tile | base_grid); default: the model's YAML")
    ap.add_argument("--merge-dir", default=None, help="a folder of earlier CSVs (e.g. results/efficiency): rows of <model>_<device>.csv "
                    "there that this run does not re-measure are kept in the new CSV (same device only)")
    args = ap.parse_args(argv)
    args.models = args.models or (TINY_MODELS if args.tiny else DEFAULT_MODELS)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.repeats = args.repeats if args.repeats is not None else (2 if args.tiny else 10)
    unknown = [m for m in args.models if m not in SIZES]
    if unknown:
        ap.error(f"no image sizes for {', '.join(unknown)}; known: {', '.join(SIZES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available (use --device cpu with --tiny)")
    return [measure_model(model, args)[0] for model in args.models]


if __name__ == "__main__":
    main()
