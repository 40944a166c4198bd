"""Scoring + bookkeeping overhead of the in-LLM methods vs their pruned prefill time, eager and CUDA graph.

LLaVA-1.5-7B shapes with random weights (``bench/assets/configs/llava-1.5-7b-hf.json``), built directly
on the GPU in fp16 with SDPA; prompt = 35 prefix + 576 image + 25 text tokens,
no padding; each method prunes 576 -> 64 visual tokens at its first pruning layer (``budget: after_prune``;
multi-stage methods continue their own schedule), at batch 1 and 16.

Definitions (one row per method x batch x mode):

* ``prefill_ms``: median time of the hooked, pruned LLM prefill: the method scores and selects at
  its layers (``mode=eager``: ``adapter.prefill(prepared, method)``, KV cache written, as generation
  runs it; ``mode=graph``: the same forward captured once in a CUDA graph and replayed, no KV cache,
  :class:`bench.measure.latency.GraphPrefill`);
* ``prefill_fixed_ms``: the same prefill, same hooks, gathers, masks and positions, but the method is
  replaced by :class:`FixedSelection`, which returns the kept indices (and SparseVLM's merged tokens)
  that the method chose, as constants: no scoring, no selection, no capture or TTV hooks;
* ``overhead_ms``: median over repeats of the paired difference ``prefill - prefill_fixed`` (the two
  are timed alternately): what scoring and selecting cost on top of pruning to a known set;
  ``overhead_pct = 100 * overhead_ms / prefill_ms`` (target: <= 3);
* ``fixed_equals_method``: the fixed-selection prefill gives bit-identical logits (eager, KV cache);
* ``unpruned_prefill_ms``: the same prefill without any method (same mode);
* ``decode_step_ms`` / ``decode_step_unpruned_ms`` (eager rows only): median time of one greedy
  decoding step with the KV cache after the pruned / unpruned prefill (hooks installed for the
  pruned one), over ``--repeats`` consecutive steps after ``--warmup`` steps.

Timers: CUDA events on GPU; ``perf_counter`` on CPU (graph mode is then null, with a note).

``--profile PATH`` (CUDA) also writes where the overhead goes: per method and batch, the GPU kernels
of an eager prefill with the method and with :class:`FixedSelection` (``torch.profiler``, averaged over
``--repeats`` prefills), one row per kernel name with its launches and device time per prefill in both
and their difference, largest differences first, plus a ``TOTAL`` row.
CPU smoke test: ``--smoke`` (8-layer tiny LLaVA on CPU, 2 repeats, batches 1 and 2).
Writes ``--out`` (default ``results/inllm_overhead.csv``). No hydra / lmms-eval imports (runs on the GPU machine).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import platform
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

METHODS = ["fastv", "pdrop", "sparsevlm", "dart", "transprune", "vscan"]
NO_METHOD = types.SimpleNamespace(stage="none", name="none")  # adapter.llm_pruning -> no hooks


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


def prepared_batch(ad, b: int, n_text: int = 25, prefix: int = 35, n_vis: int = 576, n_in: int = 576):
    from bench.models.base import PreparedBatch

    t = prefix + n_vis + n_text
    dev = ad.model.device
    g = torch.Generator(device="cpu").manual_seed(0)
    d = ad.model.config.text_config.hidden_size
    emb = (torch.randn(b, t, d, generator=g) * 0.02).to(dev, ad.model.dtype)
    ids = torch.zeros(b, t, dtype=torch.long, device=dev)
    mask = torch.ones(b, t, dtype=torch.long, device=dev)
    spans = torch.tensor([[prefix, prefix + n_vis]] * b)
    return PreparedBatch(ids, emb, mask, [n_in] * b, [n_vis] * b,
                         extras={"image_spans": spans, "sample_seeds": torch.arange(b)})


def make_method(name: str, ratio: float, n_layers: int):
    import importlib

    mod = {"fastv": ("methods.fastv", "FastV"), "pdrop": ("methods.pdrop", "PyramidDrop"),
           "sparsevlm": ("methods.sparsevlm", "SparseVLM"), "dart": ("methods.dart", "DART"),
           "transprune": ("methods.transprune", "TransPrune"), "vscan": ("methods.vscan", "VScan")}[name]
    cls = getattr(importlib.import_module(mod[0]), mod[1])
    # VScan's official setting is the 64-token layer mean: 96 enter the LLM (its pre-LLM selection), 32 after layer 16
    return cls(prune_ratio=ratio, budget="official" if name == "vscan" else "after_prune")


class FixedSelection:
    """An in-LLM "method" that prunes to a recorded selection: the reference for the overhead.

    Same plan (layers, counts, position policy) as ``method``; :meth:`prune` returns the kept indices
    (and merged tokens) that ``method`` chose on this batch, already on the device.
    """

    stage = "in_llm"
    capture_offsets: tuple = ()

    def __init__(self, method, records: list[dict], device):
        from methods.inllm import StageOut

        self._method = method
        self.name = f"{method.name}_fixed"
        self._out = StageOut
        self._records = records
        self._device = device
        self._by_plan: dict[int, tuple] = {}

    def plan(self, n_vis: int, n_layers: int):
        plan = self._method.plan(n_vis, n_layers)
        executed = sorted(range(len(plan)), key=lambda i: (plan[i].layer, i))  # the runner's order
        for j, i in enumerate(executed):
            rec = self._records[j]
            merged = rec.get("merged")
            self._by_plan[i] = (rec["kept_rel"].to(self._device),
                                None if merged is None else merged.to(self._device))
        return plan

    def prune(self, i, stage, view):
        keep, extra = self._by_plan[i]
        return self._out(keep, extra)


class Timer:
    """CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def time(self, fn) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            return s.elapsed_time(e)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def paired(timer, fa, fb, warmup: int, repeats: int) -> tuple[float, float, float]:
    """Medians of ``fa``, ``fb`` and of their paired difference, timed alternately."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timer.time(fa))
        tb.append(timer.time(fb))
    return statistics.median(ta), statistics.median(tb), statistics.median([a - b for a, b in zip(ta, tb)])


def decode_steps(ad, prepared, method, timer, warmup: int, repeats: int) -> float:
    """Median time of one greedy decoding step with the KV cache after the (pruned) prefill."""
    ctx = ad.llm_pruning(method, prepared) if method is not None else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        first = ad.prefill(prepared)
        cache = first.past_key_values
        tok = first.logits[:, -1:].argmax(-1)
        mask = prepared.attention_mask
        pos = mask.long().sum(-1, keepdim=True) - 1
        times = []
        for step in range(warmup + repeats):
            mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            pos = pos + 1
            t = timer.time(lambda: ad.model(input_ids=tok, attention_mask=mask, position_ids=pos,
                                            past_key_values=cache, use_cache=True))
            if step >= warmup:
                times.append(t)
    return statistics.median(times)


def kernel_profile(ad, prepared, method, fixed, repeats: int, top: int = 30) -> list[dict]:
    """Per kernel name: launches and device microseconds per eager prefill, method vs fixed selection
    (on CPU: aten ops and their CPU time, so the path runs in the smoke test)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = prepared.inputs_embeds.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    per = {}
    for tag, m in (("method", method), ("fixed", fixed)):
        ad.prefill(prepared, m)
        sync()
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                ad.prefill(prepared, m)
            sync()
        for e in prof.key_averages():
            us = e.self_device_time_total if cuda else e.self_cpu_time_total
            if e.count and us:
                d = per.setdefault(e.key, {"method": (0, 0.0), "fixed": (0, 0.0)})
                d[tag] = (e.count / repeats, us / repeats)
    rows = [{"kernel": k[:160], "launches_method": round(v["method"][0], 2), "launches_fixed": round(v["fixed"][0], 2),
             "us_method": round(v["method"][1], 2), "us_fixed": round(v["fixed"][1], 2),
             "us_diff": round(v["method"][1] - v["fixed"][1], 2)} for k, v in per.items()]
    total = {"kernel": "TOTAL", **{c: round(sum(r[c] for r in rows), 2)
                                   for c in ("launches_method", "launches_fixed", "us_method", "us_fixed", "us_diff")}}
    rows.sort(key=lambda r: -abs(r["us_diff"]))
    return [total] + rows[:top]


def graph_fn(ad, prepared, method):
    from bench.measure.latency import GraphPrefill

    g = GraphPrefill(ad, prepared, method)
    return g, g.replay



def write_rows(path: Path, rows: list[dict]) -> None:
    """``rows`` as a CSV at ``path`` (rewritten whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny model, 2 repeats, batches 1,2")
    ap.add_argument("--tiny", action="store_true", help="8-layer tiny LLaVA")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--modes", default="eager,graph")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(ROOT / "results" / "inllm_overhead.csv"))
    ap.add_argument("--profile", default=None, help="also write a per-kernel breakdown (method vs fixed, eager prefill) to this CSV")
    args = ap.parse_args(argv)
    if args.smoke:
        args.tiny, args.device, args.warmup, args.repeats = True, "cpu", 1, 2
        if args.batches == "1,16":
            args.batches = "1,2"
    if args.device == "cpu":
        torch.set_num_threads(2)
    t_start = time.time()
    ad = build(args)
    device = torch.device(args.device)
    timer = Timer(device)
    n_layers = ad.model.config.text_config.num_hidden_layers
    ratio = 1 - 64 / 576
    modes = [m for m in args.modes.split(",") if m]
    import transformers

    gpu = torch.cuda.get_device_name() if timer.cuda else platform.processor() or "cpu"
    versions = f"torch={torch.__version__};transformers={transformers.__version__}"
    rows, kernel_rows = [], []
    for b in [int(x) for x in args.batches.split(",")]:
        prepared = prepared_all = prepared_batch(ad, b)
        base = {}
        with torch.no_grad():
            for mode in modes:
                if mode == "eager":
                    fn = lambda: ad.prefill(prepared)  # noqa: E731
                    base[mode] = paired(timer, fn, fn, args.warmup, args.repeats)[0]
                elif timer.cuda:
                    g, fn = graph_fn(ad, prepared, NO_METHOD)
                    base[mode] = paired(timer, fn, fn, args.warmup, args.repeats)[0]
                    del g
        dec_base = decode_steps(ad, prepared, None, timer, args.warmup, args.repeats) if "eager" in modes else None
        for name in args.methods.split(","):
            m = make_method(name, ratio, n_layers)
            if not args.tiny:
                m.ref_layers = n_layers
            note0 = ""
            prepared = prepared_all
            if getattr(m, "pre_llm_selection", False):  # its stages run on what its pre-LLM selection kept
                prepared = prepared_batch(ad, b, n_vis=m.counts(576)[0])
                note0 = f"{prepared.visual_tokens_kept[0]} visual tokens enter the LLM (pre-LLM selection not timed here: bench_selection.py); unpruned_prefill_ms is the 576-token prefill"
            with torch.no_grad():
                ref = ad.prefill(prepared, m).logits  # records the method's selection on this batch
                fixed = FixedSelection(m, prepared.extras["llm_stages"], device)
                same = bool(torch.equal(ad.prefill(prepared, fixed).logits, ref))  # the reference prunes identically
                del ref
            counts = prepared.extras["visual_tokens_per_layer"][0].tolist()
            if args.profile:
                with torch.no_grad():
                    kernel_rows += [{"method": name, "batch": b, **r} for r in kernel_profile(ad, prepared, m, fixed, args.repeats)]
            dec = decode_steps(ad, prepared, m, timer, args.warmup, args.repeats) if "eager" in modes else None
            for mode in modes:
                note = note0
                total = fixed_ms = over = None
                with torch.no_grad():
                    if mode == "eager":
                        total, fixed_ms, over = paired(timer, lambda: ad.prefill(prepared, m), lambda: ad.prefill(prepared, fixed),
                                                       args.warmup, args.repeats)
                    elif not timer.cuda:
                        note = "graph mode needs CUDA"
                    else:
                        try:
                            g1, f1 = graph_fn(ad, prepared, m)
                            g2, f2 = graph_fn(ad, prepared, fixed)
                            total, fixed_ms, over = paired(timer, f1, f2, args.warmup, args.repeats)
                            del g1, g2
                        except Exception as e:  # noqa: BLE001 - a capture failure is a result to record
                            note = note0 + f"capture failed: {type(e).__name__}: {str(e)[:120]}"
                row = {"method": name, "batch": b, "mode": mode,
                       "prefill_ms": None if total is None else round(total, 3),
                       "prefill_fixed_ms": None if fixed_ms is None else round(fixed_ms, 3),
                       "overhead_ms": None if over is None else round(over, 3),
                       "overhead_pct": None if over is None else round(100 * over / total, 2),
                       "unpruned_prefill_ms": None if base.get(mode) is None else round(base[mode], 3),
                       "decode_step_ms": round(dec, 3) if mode == "eager" and dec is not None else None,
                       "decode_step_unpruned_ms": round(dec_base, 3) if mode == "eager" and dec_base is not None else None,
                       "visual_tokens_layer_mean": round(sum(counts) / len(counts), 1),
                       "gpu": gpu, "dtype": str(ad.model.dtype).replace("torch.", ""), "attn": "sdpa",
                       "timer": "cuda_events" if timer.cuda else "wall_clock", "repeats": args.repeats,
                       "fixed_equals_method": same, "versions": versions, "note": note}
                rows.append(row)
                print(",".join("" if v is None else str(v) for v in row.values()), flush=True)
                write_rows(Path(args.out), rows)  # after every row: a time-boxed call keeps what it measured
            if timer.cuda:
                torch.cuda.empty_cache()
    out = Path(args.out)
    if kernel_rows:
        write_rows(Path(args.profile), kernel_rows)
        print(f"wrote {args.profile}")
    print(f"wrote {out} in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
