#!/usr/bin/env python
"""How close does a compiled + CUDA-graph LLM prefill get to the roofline floor? (issue 6)

LLaVA-1.5-7B (``bench/assets/configs/llava-1.5-7b-hf.json``) with random fp16 weights, batch 1,
60 text tokens + {576, 64} visual tokens (the harness's synthetic prompt, ``bench.runner.probe_batch``;
64 kept by ``random``, a pre-LLM selection, so the LLM sees exactly 124 tokens). The LLM prefill is
timed in the harness's modes, through the harness's own code:

* ``eager``: ``LlavaAdapter.prefill`` (KV cache written);
* ``graph``: ``bench.measure.latency.GraphPrefill`` (CUDA graph replay, no KV cache);
* ``compiled_graph``: ``bench.measure.latency.CompiledPrefill`` for each ``--variants`` entry
  (torch.compile, then the same manual CUDA-graph capture), with its compile time, the graphs dynamo
  made for it (1 expected: the layer scope reuses one graph for all 32 layers) and the largest logit
  difference from the uncompiled forward.

Ceilings (dense fp16 matmul, device copy) are measured in this process, and the floor is the
harness's (``bench.runner.roofline``: max(LLM FLOPs / matmul peak, LLM + lm_head weight bytes /
copy bandwidth)). Prints floor multiples and the 576 -> 64 speed-up as a share of the floor ratio
(targets: <= 1.6x the floor at 64 tokens, >= 80% of the floor ratio), and writes one CSV row per
(mode, variant, visual tokens) to ``--out``, row by row, so a run cut short keeps what it measured.
Variants start only while ``--budget-s`` is not spent (a compile cannot be interrupted).

    python scripts/probe_compiled_prefill.py --out $OUT/probe_compiled_prefill.csv      # H100, ~3-5 min
    python scripts/probe_compiled_prefill.py --smoke --out /tmp/probe.csv               # CPU code-path check
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "bench/assets/configs/llava-1.5-7b-hf.json"
GPU_VARIANTS = ["inductor-layers", "inductor", "inductor-max-autotune-layers"]
# --smoke on CPU: inductor's C++ code generation takes minutes on a small shared CPU; aot_eager runs
# the same dynamo trace (fullgraph, static shapes) without code generation
SMOKE_VARIANTS = ["aot_eager-layers", "aot_eager"]
SMOKE_SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}
FIELDS = [
    "mode", "variant", "visual_tokens", "text_tokens", "seq_len", "batch", "median_ms", "iqr_ms", "repeats", "timer",
    "floor_ms", "floor_multiple", "compile_s", "dynamo_graphs", "max_abs_diff_vs_eager", "max_abs_eager",
    "llm_prefill_flops", "llm_weight_bytes", "matmul_tflops_per_s", "copy_gb_per_s",
    "device", "driver", "torch", "transformers", "dtype", "attn_backend", "note",
]


def smoke_config(path: Path) -> Path:
    cfg = json.loads(CONFIG.read_text())
    cfg["text_config"].update(SMOKE_SIZES)
    cfg["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    path.write_text(json.dumps(cfg))
    return path


def driver_version() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=30, check=False).stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="CSV file (or a directory: probe_compiled_prefill.csv inside)")
    ap.add_argument("--smoke", action="store_true", help="tiny config on CPU in fp32, no CUDA graph: checks the code path only")
    ap.add_argument("--variants", nargs="*", help=f"compile variants (bench.measure.latency.COMPILE_VARIANTS); default {GPU_VARIANTS}, with --smoke {SMOKE_VARIANTS}")
    ap.add_argument("--visual", nargs="*", type=int, default=[576, 64])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--budget-s", type=float, default=240.0, help="start no further compile variant after this many seconds")
    args = ap.parse_args(argv)

    import torch
    import transformers
    from torch._dynamo.utils import counters

    from bench.measure.flops import analytic_prefill
    from bench.measure.latency import COMPILE_VARIANTS, CompiledPrefill, GraphPrefill
    from bench.measure.timing import time_fn
    from bench.models.llava import LlavaAdapter
    from bench.measure.latency import roofline
    from bench.measure.probe import probe_batch
    from methods.none import NoPruning
    from methods.random import RandomPruning

    t_start = time.time()
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("[probe] no CUDA device: run with --smoke for the CPU code-path check", file=sys.stderr)
        return 2
    variants = args.variants if args.variants is not None else (GPU_VARIANTS if cuda else SMOKE_VARIANTS)
    unknown = [v for v in variants if v not in COMPILE_VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {sorted(COMPILE_VARIANTS)}")
    if args.smoke and args.variants is None:
        print(f"[probe] --smoke: compile variants {SMOKE_VARIANTS} (inductor's CPU code generation takes minutes here; aot_eager runs the same dynamo trace without it); no CUDA graph on CPU")
    if args.smoke:
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 3)
    device = "cuda" if cuda else "cpu"
    dtype = "float16" if cuda else "float32"
    tmp = tempfile.TemporaryDirectory()
    cfg_file = smoke_config(Path(tmp.name) / "smoke.json") if args.smoke else CONFIG
    adapter = LlavaAdapter("llava15_7b", "llava-hf/llava-1.5-7b-hf", weights="random", config_file=str(cfg_file), dtype=dtype, device=device).load()
    dev = adapter.device
    n_img = adapter.grid[0] * adapter.grid[1]
    print(f"[probe] LLaVA-1.5-7B {'(smoke: tiny LLM) ' if args.smoke else ''}random {dtype} weights on {torch.cuda.get_device_name(dev) if cuda else 'cpu'}; built in {time.time() - t_start:.1f} s")

    out = args.out / "probe_compiled_prefill.csv" if args.out.suffix != ".csv" else args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    fh = out.open("w", newline="")
    writer = csv.DictWriter(fh, fieldnames=FIELDS)
    writer.writeheader()
    common = {
        "batch": args.batch, "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "driver": driver_version() if cuda else None,
        "torch": torch.__version__, "transformers": transformers.__version__, "dtype": dtype, "attn_backend": adapter.attn_implementation,
    }

    # inputs, floors (the harness's roofline; ceilings measured once, here)
    cases = {}
    for n_vis in args.visual:
        method = NoPruning() if n_vis == n_img else RandomPruning(1 - n_vis / n_img)
        batch = probe_batch(adapter, None, batch_size=args.batch)
        seeds = torch.arange(args.batch, dtype=torch.long)
        prepared = adapter.prepare(batch, method, seeds)
        assert prepared.visual_tokens_kept[0] == n_vis, (prepared.visual_tokens_kept, n_vis)
        text = int(prepared.attention_mask[0].sum()) - n_vis
        a = analytic_prefill(adapter.model.config, text, [n_vis] * adapter.num_llm_layers)
        roof = roofline(adapter, {"flops_llm_analytic": (a.llm + a.lm_head) * args.batch})
        cases[n_vis] = (method, prepared, text, roof)
    some = next(iter(cases.values()))[3]
    print(f"[probe] ceilings: matmul {some['matmul_tflops_per_s']} TFLOP/s, copy {some['copy_gb_per_s']} GB/s; LLM weights {some['llm_weight_bytes'] / 1e9:.2f} GB")

    results: dict[tuple[str, int], float | None] = {}

    def emit(mode: str, variant: str, n_vis: int, timing=None, note: str = "", **extra) -> None:
        _, prepared, text, roof = cases[n_vis]
        ms = None if timing is None else timing.median_ms
        floor = roof["llm_prefill_floor_ms"]
        row = {
            **common, "mode": mode, "variant": variant, "visual_tokens": n_vis, "text_tokens": text, "seq_len": prepared.inputs_embeds.shape[1],
            "median_ms": None if ms is None else round(ms, 4), "iqr_ms": None if timing is None else round(timing.iqr_ms, 4),
            "repeats": None if timing is None else timing.repeats, "timer": None if timing is None else timing.timer,
            "floor_ms": None if floor is None else round(floor, 4), "floor_multiple": None if (ms is None or not floor) else round(ms / floor, 3),
            "llm_prefill_flops": roof["llm_prefill_flops"], "llm_weight_bytes": roof["llm_weight_bytes"],
            "matmul_tflops_per_s": roof["matmul_tflops_per_s"], "copy_gb_per_s": roof["copy_gb_per_s"], "note": note, **extra,
        }
        writer.writerow(row)
        fh.flush()
        results[(f"{mode}:{variant}" if variant else mode, n_vis)] = ms
        x = f" = {row['floor_multiple']}x floor ({row['floor_ms']} ms)" if row["floor_multiple"] else ""
        print(f"[probe] {mode:>14} {variant:<30} {n_vis:>3} visual: {row['median_ms']} ms (IQR {row['iqr_ms']}){x} {note}  [{time.time() - t_start:.0f} s]", flush=True)

    with torch.no_grad():
        for n_vis, (method, prepared, _, _) in cases.items():
            emit("eager", "", n_vis, time_fn(lambda p=prepared, m=method: adapter.prefill(p, m), dev, args.warmup, args.repeats))
            if cuda:
                g = GraphPrefill(adapter, prepared, method)
                emit("graph", "", n_vis, time_fn(g.replay, dev, args.warmup, args.repeats))
                del g
            else:
                emit("graph", "", n_vis, note="null: CUDA graphs need a GPU")
        for variant in variants:
            for n_vis, (_, prepared, _, _) in cases.items():
                if time.time() - t_start > args.budget_s:
                    emit("compiled_graph" if cuda else "compiled", variant, n_vis, note=f"skipped: --budget-s {args.budget_s:.0f} s spent")
                    continue
                mode = "compiled_graph" if cuda else "compiled"
                try:
                    graphs = counters["stats"]["unique_graphs"]
                    g = CompiledPrefill(adapter.model, prepared.inputs_embeds, prepared.attention_mask, variant, warmup=args.warmup)
                    chk = g.check()
                    timing = time_fn(g, dev, args.warmup, args.repeats)
                    emit(mode, variant, n_vis, timing, compile_s=round(g.compile_s, 2), dynamo_graphs=counters["stats"]["unique_graphs"] - graphs, **chk, note="" if cuda else "CPU: compiled, no CUDA graph")
                    del g
                except Exception as e:  # noqa: BLE001 - a variant that fails to compile or capture must not hide the others
                    emit(mode, variant, n_vis, note=f"failed: {type(e).__name__}: {str(e)[:200]}")
    fh.close()

    # summary against the targets
    hi, lo = max(args.visual), min(args.visual)
    floors = {n: cases[n][3]["llm_prefill_floor_ms"] for n in cases}
    print(f"\n[probe] summary (batch {args.batch}; floor {hi}: {floors[hi]} ms, {lo}: {floors[lo]} ms)")
    for key in dict.fromkeys(k for k, _ in results):
        a, b = results.get((key, hi)), results.get((key, lo))
        line = f"  {key:<45} {hi}: {a} ms  {lo}: {b} ms"
        if a and b:
            line += f"  speed-up {a / b:.2f}x"
            if floors[hi] and floors[lo]:
                share = (a / b) / (floors[hi] / floors[lo])
                mult = b / floors[lo]
                line += f" = {100 * share:.0f}% of the floor ratio {floors[hi] / floors[lo]:.2f}x; {lo}-token prefill {mult:.2f}x floor"
                line += f"  [{'meets' if mult <= 1.6 and share >= 0.8 else 'misses'} <=1.6x & >=80%]"
        print(line)
    print(f"[probe] wrote {out} in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
