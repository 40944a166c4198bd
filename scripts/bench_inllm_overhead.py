"""Scoring + bookkeeping overhead of the in-LLM methods vs their pruned prefill time.

LLaVA-1.5-7B shapes with random weights (``bench/assets/configs/llava-1.5-7b-hf.json``), built directly
on the GPU in fp16 with SDPA (``shared/docs/gpu.md``); prompt = 35 prefix + 576 image + 25 text tokens;
each method prunes 576 -> 64 visual tokens at its first pruning layer (``budget: after_prune``;
multi-stage methods continue their own schedule), at batch 1 and 16.

* ``prefill_ms``: median CUDA-event time of ``adapter.prefill(prepared, method)`` (the hooked, pruned
  prefill with the KV cache), after warm-up;
* ``overhead_ms``: median, over the same repeats, of the summed CUDA-event time spent inside the
  pruning hooks (the language-model pre-hook, every hooked decoder-layer pre-hook: scoring, selection,
  gathers, new masks and rotary embeddings, and method-installed hooks such as TransPrune's
  sublayer TTV hooks; captured q/k are the layer's own outputs and cost nothing);
* ``overhead_pct = 100 * overhead_ms / prefill_ms``; ``unpruned_prefill_ms`` is the same prefill without
  pruning, for reference.

CPU smoke mode: ``--tiny --device cpu`` (8-layer tiny LLaVA, wall-clock timers).
Writes ``results/inllm_overhead.csv``. No hydra / lmms-eval imports (runs on the GPU machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

METHODS = ["fastv", "pdrop", "sparsevlm", "dart", "transprune"]


def build(args):
    from transformers import LlavaConfig

    from bench.models.llava import LlavaAdapter, build_random_llava

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.tiny:
        from bench.tiny_llava import build_config

        config = build_config({"vision_hidden": 32, "vision_layers": 1, "vision_heads": 2, "vision_mlp": 64,
                               "text_hidden": 64, "text_layers": 8, "text_heads": 4, "text_mlp": 128})
    else:
        config = LlavaConfig(**json.loads((ROOT / "bench/assets/configs/llava-1.5-7b-hf.json").read_text()))
    model = build_random_llava(config, device, dtype)
    ad = LlavaAdapter("llava15_7b_random" if not args.tiny else "tiny", "unused", weights="random",
                      device=str(device), dtype="float16" if dtype == torch.float16 else "float32")
    ad.model = model
    ad.supported_stages = ad.supported_stages | {"in_llm"}
    return ad


def prepared_batch(ad, b: int, n_text: int = 25, prefix: int = 35, n_vis: int = 576):
    from bench.models.base import PreparedBatch

    t = prefix + n_vis + n_text
    dev = ad.model.device
    g = torch.Generator(device="cpu").manual_seed(0)
    d = ad.model.config.text_config.hidden_size
    emb = (torch.randn(b, t, d, generator=g) * 0.02).to(dev, ad.model.dtype)
    ids = torch.zeros(b, t, dtype=torch.long, device=dev)
    mask = torch.ones(b, t, dtype=torch.long, device=dev)
    spans = torch.tensor([[prefix, prefix + n_vis]] * b)
    return PreparedBatch(ids, emb, mask, [n_vis] * b, [n_vis] * b,
                         extras={"image_spans": spans, "sample_seeds": torch.arange(b)})


def make_method(name: str, ratio: float, n_layers: int):
    import importlib

    mod = {"fastv": ("methods.fastv", "FastV"), "pdrop": ("methods.pdrop", "PyramidDrop"),
           "sparsevlm": ("methods.sparsevlm", "SparseVLM"), "dart": ("methods.dart", "DART"),
           "transprune": ("methods.transprune", "TransPrune")}[name]
    try:
        cls = getattr(importlib.import_module(mod[0]), mod[1])
    except (ImportError, AttributeError):
        return None
    return cls(prune_ratio=ratio, budget="after_prune")


class Timer:
    """CUDA events on GPU (allocated up front, so timing a hook costs one ``record``), perf_counter on CPU."""

    def __init__(self, device, pool: int = 512):
        self.cuda = device.type == "cuda"
        self.pool = [torch.cuda.Event(enable_timing=True) for _ in range(pool)] if self.cuda else []
        self.used = 0

    def reset(self):
        self.used = 0

    def mark(self):
        if self.cuda:
            if self.used < len(self.pool):
                e = self.pool[self.used]
            else:
                e = torch.cuda.Event(enable_timing=True)
                self.pool.append(e)
            self.used += 1
            e.record()
            return e
        return time.perf_counter()

    def elapsed(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def instrument(timer, spans):
    """Wrap the runner's hooks so each call's time is appended to ``spans``; returns an undo function."""
    from bench.models import llm_pruning as lp

    orig_lm, orig_layer, orig_sub = lp._Runner.lm_pre, lp._Runner.layer_pre, lp._Runner.sub_hook

    def lm_pre(self, *a, **k):
        s = timer.mark()
        out = orig_lm(self, *a, **k)
        spans.append((s, timer.mark()))
        return out

    def layer_pre(self, *a, **k):
        s = timer.mark()
        out = orig_layer(self, *a, **k)
        spans.append((s, timer.mark()))
        return out

    def sub_hook(self, *a, **k):  # method-installed hooks (TransPrune's TTV)
        s = timer.mark()
        out = orig_sub(self, *a, **k)
        spans.append((s, timer.mark()))
        return out

    lp._Runner.lm_pre, lp._Runner.layer_pre, lp._Runner.sub_hook = lm_pre, layer_pre, sub_hook

    def undo():
        lp._Runner.lm_pre, lp._Runner.layer_pre, lp._Runner.sub_hook = orig_lm, orig_layer, orig_sub

    return undo


def measure(ad, prepared, method, timer, warmup: int, repeats: int):
    spans: list = []
    undo = instrument(timer, spans) if method is not None else (lambda: None)
    totals, overheads = [], []
    try:
        with torch.no_grad():
            for r in range(warmup + repeats):
                spans.clear()
                timer.sync()
                timer.reset()
                s = timer.mark()
                out = ad.prefill(prepared, method)
                e = timer.mark()
                timer.sync()
                del out
                if r >= warmup:
                    totals.append(timer.elapsed(s, e))
                    overheads.append(sum(timer.elapsed(a, b) for a, b in spans))
    finally:
        undo()
    return statistics.median(totals), statistics.median(overheads)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="8-layer tiny LLaVA (CPU smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(ROOT / "results" / "inllm_overhead.csv"))
    args = ap.parse_args(argv)
    if args.tiny and args.device == "cpu":
        torch.set_num_threads(2)
    ad = build(args)
    timer = Timer(torch.device(args.device))
    n_layers = ad.model.config.text_config.num_hidden_layers
    ratio = 1 - 64 / 576
    import transformers

    gpu = torch.cuda.get_device_name() if timer.cuda else platform.processor() or "cpu"
    versions = f"torch={torch.__version__};transformers={transformers.__version__}"
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        prepared = prepared_batch(ad, b)
        base, _ = measure(ad, prepared, None, timer, args.warmup, args.repeats)
        for name in args.methods.split(","):
            m = make_method(name, ratio, n_layers)
            if m is None:
                print(f"skip {name}: not implemented", file=sys.stderr)
                continue
            if not args.tiny:
                m.ref_layers = n_layers
            total, over = measure(ad, prepared, m, timer, args.warmup, args.repeats)
            counts = prepared.extras["visual_tokens_per_layer"][0].tolist()
            row = {"method": name, "batch": b, "prefill_ms": round(total, 3), "overhead_ms": round(over, 3),
                   "overhead_pct": round(100 * over / total, 2), "unpruned_prefill_ms": round(base, 3),
                   "visual_tokens_layer_mean": round(sum(counts) / len(counts), 1),
                   "gpu": gpu, "dtype": str(ad.model.dtype).replace("torch.", ""), "attn": "sdpa",
                   "repeats": args.repeats, "versions": versions}
            rows.append(row)
            print(",".join(str(v) for v in row.values()), flush=True)
        if timer.cuda:
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
