"""Time every vision-side method's selection work, eager and CUDA-graph replay, and write a CSV.

What is timed ("selection"): everything a method costs on top of the plain LLaVA vision encode,
given that encode's outputs (projected features + the tower's hidden states): building the extras it
asks for (CLS-attention rows, keys, q/k recomputed from one layer's input) and ``method.reduce``
(selection, merging, projector on merged tokens). The vision tower forward itself is excluded.

Modes (column ``mode``):

* ``eager``: the Python calls as the adapter makes them without graphs;
* ``graph``: ``bench.models.clip_extras.GraphedSelection``, what the adapter runs on CUDA: copy the
  inputs into the captured graph's static buffers, replay, clone the outputs (all three timed). The
  column ``matches_eager`` says whether the replayed outputs were bit-identical to the eager ones.
  Methods that are not graph safe (PruMerge's adaptive budget: its length depends on the values) get
  an empty graph row saying why.

ToMe merges inside the tower, so it has two rows per mode: ``tome`` is its own overhead, the 23
per-block bipartite matchings + size-weighted merges run on the inputs recorded from a merging
forward (``bench.models.vision_merge.merge_step``); ``tome[tower-plain]`` is ``median(merging tower)
- median(plain tower)``, both from pixels to projected features (negative when the smaller token
count saves more than the merging costs); the note gives both absolute medians. FlowCut cuts between the
tower's blocks: one row per mode, ``flowcut[tower-plain]``, the same difference of towers.

CDPruner's rows time its whole selection given the tower's outputs: the question's tokenisation and CLIP text
tower (CLIP ViT-L/14-336's text shapes, random weights: 12 layers x 768, one 77-token chunk), the image side's
``visual_projection`` of ``post_layernorm(h[-2])``, the kernel and the greedy DPP, one sample at a time as the
harness runs it (eager: the tokenizer runs on the host, so it is not CUDA-graph capturable). ``cdpruner[kernel+dpp]``
times the kernel + DPP alone given the embeddings (the text tower shared across a batch's questions would not
change it), eager and replayed from a CUDA graph, to show what the rule itself costs.

VScan's row is its pre-LLM part at the layer-mean budget (two CLS rows, the scans, the merge; at ``kept``
= 64 it keeps 96, said in the note); its in-LLM stage is timed by ``benchmarks/bench_inllm_overhead.py``.

Real CLIP ViT-L/14-336 + LLaVA-1.5 projector shapes with random weights (``--tower llava15``, fp16 on
CUDA); ``--tower tiny`` uses a small test tower. Timing: CUDA events (``perf_counter`` on CPU),
``--warmup`` untimed calls, median of ``--repeats`` calls. ``--smoke`` is a quick CPU check.

Usage::

    python benchmarks/bench_selection.py --out results/selection_overhead.csv
    python benchmarks/bench_selection.py --smoke --out /tmp/sel.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure.timing import time_fn  # noqa: E402
from bench.models.clip_extras import GraphedSelection, build_extras  # noqa: E402
from bench.models.llava import build_random_llava  # noqa: E402
from bench.models.vision_merge import feature_block_count, merge_step, merged_features, merging_encoder  # noqa: E402
from methods.base import CudaGraphCache, VisionContext  # noqa: E402
from methods.cdpruner import CDPruner, conditional_kernel, greedy_dpp  # noqa: E402
from methods.divprune import DivPrune  # noqa: E402
from methods.fastervlm import FasterVLM  # noqa: E402
from methods.flowcut import FlowCut  # noqa: E402
from methods.gprune import GPrune  # noqa: E402
from methods.hiprune import HiPrune  # noqa: E402
from methods.holov import HoloV  # noqa: E402
from methods.prumerge import PruMerge, PruMergePlus  # noqa: E402
from methods.tome import ToMe  # noqa: E402
from methods.vscan import VScan  # noqa: E402
from methods.visionzip import VisionZip  # noqa: E402
from methods.vispruner import VisPruner  # noqa: E402

TINY = {"vision_hidden": 32, "vision_layers": 4, "vision_heads": 2, "vision_mlp": 64, "text_hidden": 64, "text_layers": 1, "text_heads": 2, "text_mlp": 128}
FIELDS = ["method", "mode", "batch", "kept", "median_ms", "per_image_ms", "p25_ms", "p75_ms", "matches_eager", "gpu", "torch", "dtype", "note"]


def variants(ratio: float, device: str):
    """(label, method) pairs timed for one budget; unlabelled backends are the configs' defaults."""
    out = [
        ("fastervlm", FasterVLM(prune_ratio=ratio)),
        ("visionzip", VisionZip(prune_ratio=ratio)),
        ("divprune", DivPrune(prune_ratio=ratio)),
        ("vispruner", VisPruner(prune_ratio=ratio)),
    ]
    if device == "cuda":  # "auto" is Triton (DivPrune) / CUDA (VisPruner) there; the batched-torch rules for comparison
        out += [("divprune[torch]", DivPrune(prune_ratio=ratio, backend="torch")), ("vispruner[torch]", VisPruner(prune_ratio=ratio, backend="torch"))]
    out += [
        ("hiprune", HiPrune(prune_ratio=ratio)),
        ("prumerge", PruMerge(prune_ratio=ratio)),
        ("prumerge_plus", PruMergePlus(prune_ratio=ratio)),
        ("prumerge[adaptive]", PruMerge(prune_ratio=ratio, budget="adaptive")),
        ("tome", ToMe(prune_ratio=ratio)),
        ("gprune", GPrune(prune_ratio=ratio, rounding="round")),
        ("holov", HoloV(prune_ratio=ratio)),
        ("flowcut", FlowCut(prune_ratio=ratio)),
        ("vscan", VScan(prune_ratio=ratio)),  # its pre-LLM part (P = 1.5 x kept); its LLM stage: bench_inllm_overhead.py
        ("vscan[matmul]", VScan(prune_ratio=ratio, merge_similarity="matmul")),
        ("cdpruner", CDPruner(prune_ratio=ratio)),
        ("cdpruner[kernel+dpp]", CDPruner(prune_ratio=ratio)),
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
    """The slice of ``LlavaAdapter`` that the selection and merging paths use, around a bare model."""

    def __init__(self, model, device, dtype, tower: str = "llava15"):
        self.model, self.device, self.dtype, self.tower = model, device, dtype, tower
        vc = model.config.vision_config
        self.grid = (vc.image_size // vc.patch_size,) * 2
        self._text = None

    def clip_text(self):
        """A random-weight CLIP text side (``bench.models.clip_text.ClipTextSide``) at CLIP ViT-L/14-336's text shapes
        (``--tower tiny``: a small one), float32 as the official code loads it; built on first use."""
        if self._text is None:
            from transformers import CLIPTextConfig, CLIPTextModelWithProjection

            from bench.models.clip_text import ClipTextSide
            from bench.tiny_clip_text import build_clip_tokenizer

            tok = build_clip_tokenizer()
            big = self.tower != "tiny"
            cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=768 if big else 32, intermediate_size=3072 if big else 64,
                                 num_hidden_layers=12 if big else 2, num_attention_heads=12 if big else 2, projection_dim=768 if big else 24,
                                 max_position_embeddings=77, bos_token_id=len(tok) - 2, eos_token_id=2)
            side = ClipTextSide("random", self.device)
            side.tokenizer = tok
            side.text_tower = CLIPTextModelWithProjection(cfg).to(self.device).eval()
            side.visual_projection = torch.nn.Linear(self.model.config.vision_config.hidden_size, cfg.projection_dim, bias=False).to(self.device)
            side.max_position_embeddings = 77
            self._text = side
        return self._text

    def extras(self, hidden, needs, b):
        """``build_extras`` + the CLIP text side for ``b`` copies of a typical question, as the adapter builds them."""
        from bench.models.clip_extras import vision_model
        from bench.models.clip_text import build_text_extras

        out = build_extras(self.model, hidden, needs)
        if any(k.startswith("clip_") for k in needs):
            out.update(build_text_extras(self.clip_text(), vision_model(self.model), hidden, self.model.config.vision_feature_layer,
                                         ["What is the colour of the object at the centre of the image?"] * b, needs))
        return out

    @torch.no_grad()
    def encode_images(self, px, output_hidden_states=False):
        cfg = self.model.config
        out = self.model.model.get_image_features(pixel_values=px, vision_feature_layer=cfg.vision_feature_layer, vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True, **({"output_hidden_states": True} if output_hidden_states else {}))
        feats = out.pooler_output
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        return (feats, out.hidden_states) if output_hidden_states else feats


def quart(v: list[float]) -> tuple[float, float, float]:
    if len(v) < 2:
        return v[0], v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], statistics.median(v), q[2]


def same(a, b) -> bool:
    """Bit-identical (tensors, ``None`` or tuples of them)."""
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--tower", choices=["llava15", "tiny"], default=None, help="default: llava15 (tiny with --smoke)")
    ap.add_argument("--batches", default=None, help="default: 1,16 (1,2 with --smoke)")
    ap.add_argument("--kept", default=None, help="default: 192,128,64 (192 with --smoke)")
    ap.add_argument("--repeats", type=int, default=None, help="default: 100 (3 with --smoke)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--modes", default="eager,graph", help="graph needs CUDA; ignored on CPU")
    ap.add_argument("--methods", default="", help="comma-separated labels to time (default: all)")
    ap.add_argument("--smoke", action="store_true", help="quick check: tiny tower, few repeats, CPU unless --device says otherwise")
    ap.add_argument("--out", default=str(ROOT / "results/selection_overhead.csv"))
    args = ap.parse_args()

    smoke = args.smoke
    device = torch.device(args.device or ("cpu" if smoke or not torch.cuda.is_available() else "cuda"))
    tower = args.tower or ("tiny" if smoke else "llava15")
    batches = [int(x) for x in (args.batches or ("1,2" if smoke else "1,16")).split(",")]
    kept_list = [int(x) for x in (args.kept or ("192" if smoke else "192,128,64")).split(",")]
    repeats = args.repeats or (3 if smoke else 100)
    warmup = args.warmup if args.warmup is not None else (1 if smoke or device.type != "cuda" else 10)
    modes = [m for m in args.modes.split(",") if m and (m == "eager" or device.type == "cuda")]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    only = {m for m in args.methods.split(",") if m}

    torch.manual_seed(0)
    model = build(tower, device, dtype)
    ad = Adapter(model, device, dtype, tower)
    n = ad.grid[0] * ad.grid[1]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    base = {"gpu": gpu, "torch": torch.__version__, "dtype": str(dtype).replace("torch.", "")}
    rows: list[dict] = []

    def timed(fn) -> tuple[float, float, float]:
        return quart(time_fn(fn, device, warmup=warmup, repeats=repeats).samples_ms)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(rows):
        tmp = out.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, out)

    def emit(label, mode, b, kept, q=None, note="", matches=""):
        row = {"method": label, "mode": mode, "batch": b, "kept": kept, "median_ms": "", "per_image_ms": "", "p25_ms": "", "p75_ms": "", "matches_eager": matches, **base, "note": note}
        if q is not None:
            p25, med, p75 = q
            row.update(median_ms=f"{med:.4f}", per_image_ms=f"{med / b:.4f}", p25_ms=f"{p25:.4f}", p75_ms=f"{p75:.4f}")
            print(f"{label:20s} {mode:5s} B={b:<3d} kept={kept:<4d} median {med:8.3f} ms  per image {med / b:7.3f} ms  [{p25:.3f}, {p75:.3f}] {matches}", flush=True)
        else:
            print(f"{label:20s} {mode:5s} B={b:<3d} kept={kept:<4d} -- {note}", flush=True)
        rows.append(row)
        write(rows)  # after every row: a time-boxed GPU call keeps what it measured

    def release():
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for b in batches:
        px = torch.randn(b, 3, ad.grid[0] * model.config.vision_config.patch_size, ad.grid[1] * model.config.vision_config.patch_size, device=device, dtype=dtype)
        with torch.no_grad():
            feats, hidden = ad.encode_images(px, output_hidden_states=True)
            plain = {}
            for kept in kept_list:
                ratio = 1 - kept / n
                for label, m in variants(ratio, device.type):
                    if only and label not in only:
                        continue
                    for mode in modes:
                        try:
                            if m.stage == "in_vision" and hasattr(m, "after_block"):
                                cut_tower_rows(label, m, mode, b, kept, px, ad, plain, timed, emit)
                            elif m.stage == "in_vision":
                                tome_rows(m, mode, b, kept, px, ad, plain, timed, emit)
                            elif label == "cdpruner[kernel+dpp]":
                                cdpruner_core_row(label, m, mode, b, kept, feats, hidden, ad, timed, emit)
                            else:
                                selection_row(label, m, mode, b, kept, feats, hidden, ad, timed, emit)
                        except Exception as e:  # a failing variant must not lose the other rows
                            print(f"{label} {mode} B={b} kept={kept}: FAILED {type(e).__name__}: {e}", flush=True)
                            emit(label, mode, b, kept, note=f"failed: {type(e).__name__}: {e}"[:200])
                        release()
    print(f"wrote {out} ({len(rows)} rows)")
    return 0


def selection_row(label, m, mode, b, kept, feats, hidden, ad, timed, emit):
    seeds = torch.arange(b)

    def eager():
        ctx = VisionContext(ad.grid, True, seeds, ad.extras(hidden, m.needs, b))
        return m.reduce(feats, ctx)

    note = "extras+reduce given tower outputs"
    ref = eager()
    if m.name == "prumerge" and getattr(m, "budget", "") == "adaptive":
        note += f"; adaptive budget, kept {ref.n_kept.tolist()[:4]}"
    elif int(ref.n_kept.max()) != kept:
        note += f"; kept {int(ref.n_kept.max())}"
    if m.name == "vispruner" and m.backend != "torch":  # a backend must keep what the torch rounds keep
        from dataclasses import replace

        alt = replace(m, backend="torch").reduce(feats, VisionContext(ad.grid, True, seeds, build_extras(ad.model, hidden, m.needs)))
        note += f"; picks equal backend=torch: {str(torch.equal(alt.kept_index, ref.kept_index)).lower()}"
    if mode == "eager":
        emit(label, mode, b, kept, timed(eager), note)
        return
    if not m.graph_safe:
        why = ("the question is tokenised on the host and its chunk count read back" if m.name == "cdpruner"
               else "value-dependent output length, host-side IQR budget")
        emit(label, mode, b, kept, note=f"not measured: not CUDA-graph capturable ({why}); eager only")
        return
    g = GraphedSelection(ad.model, m, ad.grid, True)
    got = g(feats, hidden)
    matches = same((got.features, got.kept_index, got.n_kept), (ref.features, ref.kept_index, ref.n_kept))
    emit(label, mode, b, kept, timed(lambda: g(feats, hidden)), note + "; graph replay incl. input copies and output clones", str(matches).lower())


def cdpruner_core_row(label, m, mode, b, kept, feats, hidden, ad, timed, emit):
    """CDPruner's kernel + greedy DPP given the CLIP embeddings, per sample (as ``CDPruner.select_with_counts``)."""
    ctx = VisionContext(ad.grid, True, torch.arange(b), ad.extras(hidden, m.needs, b))
    img, txt, chunks = ctx.get("clip_image_embeds"), ctx.get("clip_text_embeds"), ctx.get("clip_text_chunks").to(feats.device)
    t = m.n_keep(feats.shape[1])

    def core(f, i, x, c):
        return torch.cat([greedy_dpp(conditional_kernel(f[s : s + 1], i[s : s + 1], x[s : s + 1], c[s : s + 1]), t) for s in range(f.shape[0])])

    ref = core(feats, img, txt, chunks)
    want = m.select_with_counts(feats, ctx)[0]
    same_set = all(sorted(set(ref[s].tolist())) == want[s, : len(set(ref[s].tolist()))].tolist() for s in range(b))
    note = f"kernel + greedy DPP ({t} steps) given the CLIP embeddings; picks as CDPruner.select: {str(same_set).lower()}"
    if mode == "eager":
        emit(label, mode, b, kept, timed(lambda: core(feats, img, txt, chunks)), note)
        return
    g = CudaGraphCache(core)
    got = g(feats, img, txt, chunks)
    emit(label, mode, b, kept, timed(lambda: g(feats, img, txt, chunks)), note + "; graph replay incl. input copies and output clones",
         str(same(got, ref)).lower())


def cut_tower_rows(label, m, mode, b, kept, px, ad, plain, timed, emit):
    """FlowCut: its pruning tower (one image at a time, eager: its cuts are read back to the host) minus the
    plain tower, pixels to projected features."""
    from bench.models.vision_prune import encode_with_pruning

    if mode != "eager":
        emit(label, mode, b, kept, note="not measured: the per-block cut depends on the attention values (host sync); eager only")
        return
    key = (mode, b)
    if key not in plain:
        plain[key] = timed(lambda: ad.encode_images(px))
    tower = timed(lambda: encode_with_pruning(ad, px, m))
    diff = tuple(x - y for x, y in zip(tower, plain[key]))
    emit(f"{label}[tower-plain]", mode, b, kept, diff, f"pruning tower (per image) minus plain tower, pixels to projected features (pruning median {tower[1]:.3f} ms, plain median {plain[key][1]:.3f} ms)")


def tome_rows(m, mode, b, kept, px, ad, plain, timed, emit):
    model = ad.model
    sched = m.schedule(ad.grid[0] * ad.grid[1], feature_block_count(model), True)
    trace: list = []
    merging_encoder(model, px, sched, bool(m.prop_attn), trace=trace)
    ins = [t for step in trace for t in step[:3] if t is not None]
    layout = [(step[1] is not None, step[3]) for step in trace]

    def merges(*tensors):
        out, it = [], iter(tensors)
        for has_size, r in layout:
            x = next(it)
            size = next(it) if has_size else None
            out.append(merge_step(x, size, next(it), r, True)[0])
        return tuple(out)

    def tower():
        return merged_features(model, px, sched, bool(m.prop_attn))

    if mode == "eager":
        own = timed(lambda: merges(*ins))
        plain_fn, tower_fn, matches = (lambda: ad.encode_images(px)), tower, ""
    else:
        g_merge, g_tower, g_plain = CudaGraphCache(merges), CudaGraphCache(lambda p: merged_features(model, p, sched, bool(m.prop_attn))), CudaGraphCache(lambda p: ad.encode_images(p))
        matches = str(same(g_merge(*ins), merges(*ins)) and same(g_tower(px), tower())).lower()
        graph = g_merge.graphs[g_merge.signature(tuple(ins))][1]
        own = timed(graph.replay)  # the inputs already sit in the static buffers: 23 copies would be timed otherwise
        plain_fn, tower_fn = (lambda: g_plain(px)), (lambda: g_tower(px))
    note = f"matching + merge of the {len(sched)} blocks on recorded block inputs" + ("; replay only" if mode == "graph" else "")
    emit("tome", mode, b, kept, own, note, matches)
    key = (mode, b)
    if key not in plain:
        plain[key] = timed(plain_fn)
    merged = timed(tower_fn)
    diff = tuple(x - y for x, y in zip(merged, plain[key]))
    emit("tome[tower-plain]", mode, b, kept, diff, f"merging tower minus plain tower, pixels to projected features (merging median {merged[1]:.3f} ms, plain median {plain[key][1]:.3f} ms)", matches)


if __name__ == "__main__":
    raise SystemExit(main())
