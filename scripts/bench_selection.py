"""Time every vision-side method's selection work on a GPU (or CPU) and write a CSV.

What is timed ("selection"): everything a method costs on top of the plain LLaVA vision encode,
given that encode's outputs (projected features + the tower's hidden states): building the extras it
asks for (CLS-attention rows, keys, q/k recomputed from one layer's input) and ``method.reduce``
(selection, merging, projector on merged tokens). The vision tower forward itself is excluded.
ToMe merges inside the tower, so its row is ``median(merging encoder) - median(plain encoder)``,
both from pixels to projected features (p25/p75 of the difference are the quartile differences).

Real CLIP ViT-L/14-336 + LLaVA-1.5 projector shapes with random weights (``--tower llava15``, fp16 on
CUDA); ``--tower tiny`` uses the small test tower (CPU smoke test). Timing: CUDA events (or
``perf_counter`` on CPU), ``--warmup`` untimed calls, median of ``--repeats`` calls.

Usage::

    python scripts/bench_selection.py --device cuda --out results/selection_overhead.csv
    python scripts/bench_selection.py --device cpu --repeats 3 --tower tiny --batches 1 --kept 64
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure.timing import time_fn  # noqa: E402
from bench.models.clip_extras import build_extras  # noqa: E402
from bench.models.llava import build_random_llava  # noqa: E402
from methods.base import VisionContext  # noqa: E402
from methods.divprune import DivPrune  # noqa: E402
from methods.fastervlm import FasterVLM  # noqa: E402
from methods.hiprune import HiPrune  # noqa: E402
from methods.prumerge import PruMerge, PruMergePlus  # noqa: E402
from methods.tome import ToMe  # noqa: E402
from methods.visionzip import VisionZip  # noqa: E402
from methods.vispruner import VisPruner  # noqa: E402

TINY = {"vision_hidden": 32, "vision_layers": 4, "vision_heads": 2, "vision_mlp": 64, "text_hidden": 64, "text_layers": 1, "text_heads": 2, "text_mlp": 128}


def variants(ratio: float, device: str):
    """(label, method) pairs timed for one budget."""
    out = [
        ("fastervlm", FasterVLM(prune_ratio=ratio)),
        ("visionzip", VisionZip(prune_ratio=ratio)),
        ("divprune", DivPrune(prune_ratio=ratio, backend="torch")),
    ]
    if device == "cuda":
        out.append(("divprune[triton]", DivPrune(prune_ratio=ratio, backend="triton")))
    out += [
        ("vispruner", VisPruner(prune_ratio=ratio)),
        ("hiprune", HiPrune(prune_ratio=ratio)),
        ("prumerge", PruMerge(prune_ratio=ratio)),
        ("prumerge_plus", PruMergePlus(prune_ratio=ratio)),
        ("prumerge[adaptive]", PruMerge(prune_ratio=ratio, budget="adaptive")),
        ("tome", ToMe(prune_ratio=ratio)),
    ]
    return out


def build(tower: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlavaConfig

    if tower == "tiny":
        from bench.tiny_llava import build_config

        cfg = build_config(TINY)
    else:
        data = json.loads((ROOT / "bench/assets/configs/llava-1.5-7b-hf.json").read_text())
        data["text_config"]["num_hidden_layers"] = 1  # the LLM is not used here
        cfg = LlavaConfig(**data)
    return build_random_llava(cfg, device, dtype)


class Adapter:
    """The slice of ``LlavaAdapter`` that ``encode_with_merging`` uses, around a bare model."""

    def __init__(self, model, device, dtype):
        self.model, self.device, self.dtype = model, device, dtype
        vc = model.config.vision_config
        self.grid = (vc.image_size // vc.patch_size,) * 2

    @torch.no_grad()
    def encode_images(self, px, output_hidden_states=False):
        cfg = self.model.config
        out = self.model.model.get_image_features(pixel_values=px, vision_feature_layer=cfg.vision_feature_layer, vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True, **({"output_hidden_states": True} if output_hidden_states else {}))
        feats = out.pooler_output
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        return (feats, out.hidden_states) if output_hidden_states else feats


def timer(fn, device, warmup: int, repeats: int) -> list[float]:
    return time_fn(fn, device, warmup=warmup, repeats=repeats).samples_ms


def quart(v: list[float]) -> tuple[float, float, float]:
    if len(v) < 2:
        return v[0], v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], statistics.median(v), q[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tower", choices=["llava15", "tiny"], default="llava15")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--kept", default="192,128,64")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--methods", default="", help="comma-separated labels to time (default: all)")
    ap.add_argument("--out", default=str(ROOT / "results/selection_overhead.csv"))
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    warmup = args.warmup if args.warmup is not None else (10 if device.type == "cuda" else 1)
    torch.manual_seed(0)
    model = build(args.tower, device, dtype)
    ad = Adapter(model, device, dtype)
    n = ad.grid[0] * ad.grid[1]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    only = {m for m in args.methods.split(",") if m}
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        px = torch.randn(b, 3, 336, 336, device=device, dtype=dtype)
        with torch.no_grad():
            feats, hidden = ad.encode_images(px, output_hidden_states=True)
            plain = None
            for kept in [int(x) for x in args.kept.split(",")]:
                ratio = 1 - kept / n
                for label, m in variants(ratio, device.type):
                    if only and label not in only:
                        continue
                    note = "extras+reduce given tower outputs"
                    try:
                        if m.stage == "in_vision":
                            from bench.models.vision_merge import encode_with_merging

                            if plain is None:
                                plain = timer(lambda: ad.encode_images(px), device, warmup, args.repeats)
                            merged = timer(lambda: encode_with_merging(ad, px, m, torch.arange(b)), device, warmup, args.repeats)
                            p25, med, p75 = (x - y for x, y in zip(quart(merged), quart(plain)))
                            note = f"merging encoder minus plain encoder (plain median {quart(plain)[1]:.3f} ms)"
                        else:
                            seeds = torch.arange(b)

                            def run(m=m):
                                ctx = VisionContext(ad.grid, True, seeds, build_extras(model, hidden, m.needs))
                                return m.reduce(feats, ctx)

                            sel = run()
                            got = int(sel.n_kept.max())
                            if m.name == "prumerge" and getattr(m, "budget", "") == "adaptive":
                                note += f"; adaptive budget, kept {sel.n_kept.tolist()[:4]}"
                            elif got != kept:
                                note += f"; kept {got}"
                            p25, med, p75 = quart(timer(run, device, warmup, args.repeats))
                    except Exception as e:  # a failing variant must not lose the other rows
                        print(f"{label} B={b} kept={kept}: FAILED {type(e).__name__}: {e}", flush=True)
                        rows.append({"method": label, "batch": b, "kept": kept, "median_ms": "", "per_image_ms": "", "p25_ms": "", "p75_ms": "", "gpu": gpu, "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "note": f"failed: {type(e).__name__}: {e}"[:200]})
                        continue
                    row = {"method": label, "batch": b, "kept": kept, "median_ms": f"{med:.4f}", "per_image_ms": f"{med / b:.4f}", "p25_ms": f"{p25:.4f}", "p75_ms": f"{p75:.4f}", "gpu": gpu, "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "note": note}
                    rows.append(row)
                    print(f"{label:20s} B={b:<3d} kept={kept:<4d} median {med:8.3f} ms  per image {med / b:7.3f} ms  [{p25:.3f}, {p75:.3f}]", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
