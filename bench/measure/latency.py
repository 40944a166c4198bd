"""Latency that users can trust: fixed inputs, warm-up, CUDA events, many repeats, median + spread.

Stages are timed separately on the same inputs (vision encoder, method selection, LLM prefill,
one decode step), in two modes:

* ``eager``: the model's ordinary forward (what an evaluation run executes);
* ``graph``: the LLM prefill captured once in a CUDA graph and replayed, which removes the per-kernel
  launch overhead that dominates batch-1 prefill on an H100 (gpu.md). The captured forward runs
  with ``use_cache=False`` (static memory), so it excludes writing the KV cache; the record says so.

* ``compiled_graph``: the same LLM prefill compiled with ``torch.compile`` (inductor, static
  shapes), then captured in a CUDA graph and replayed exactly like ``graph``. With launches gone, what
  separates ``graph`` from the floor is transformers' many small unfused kernels (RMSNorm, RoPE,
  SiLU x mul, residual adds, casts); inductor fuses them. See :class:`CompiledPrefill` for the variants,
  the compile cache and why the capture is manual rather than ``mode="reduce-overhead"``.

The roofline floor of a prefill is ``max(FLOPs / matmul peak, weight bytes / copy bandwidth)`` with
both ceilings measured in the same process (:func:`measure_ceilings`). On CPU the same code runs
with ``perf_counter`` (labelled ``wall_clock``) and graph mode is unavailable (null, with a note).
"""

from __future__ import annotations

import contextlib
import functools
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
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


#: :func:`measure_ceilings` per device, measured once per process (an 8k matmul and a 512 MiB copy)
_CEILINGS: dict[str, dict[str, float]] = {}


def roofline(adapter, eff: dict[str, Any]) -> dict[str, Any]:
    """Measured ceilings and the LLM-prefill floor: max(FLOPs / matmul peak, weight bytes / bandwidth).

    ``eff``: the efficiency pass's results (its ``flops_llm_analytic``); the record's ``roofline``."""
    key = str(adapter.device)
    if key not in _CEILINGS:
        _CEILINGS[key] = measure_ceilings(adapter.device, adapter.dtype)
    ceil = _CEILINGS[key]
    weight_bytes = adapter.llm_weight_bytes()
    llm_flops = eff.get("flops_llm_analytic")
    return {
        "matmul_tflops_per_s": None if ceil["matmul_flops_per_s"] is None else round(ceil["matmul_flops_per_s"] / 1e12, 2),
        "copy_gb_per_s": None if ceil["copy_bytes_per_s"] is None else round(ceil["copy_bytes_per_s"] / 1e9, 1),
        "llm_weight_bytes": int(weight_bytes),
        "llm_prefill_flops": llm_flops,
        "llm_prefill_floor_ms": None if llm_flops is None else roofline_ms(llm_flops, weight_bytes, ceil),
    }


def _t(t: Timing | None) -> dict[str, Any]:
    if t is None:
        return {"median_ms": None, "iqr_ms": None}
    return {"median_ms": round(t.median_ms, 4), "iqr_ms": round(t.iqr_ms, 4)}


def capture_graph(fwd, warmup: int):
    """Warm ``fwd`` up on a side stream (allocator and lazy-init work stay out of the graph), then
    capture one call; returns ``(graph, output)``, the output living in the graph's memory."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fwd()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fwd()
    return graph, out


class GraphPrefill:
    """The LLM prefill of fixed-shape inputs captured in a CUDA graph (no KV cache written)."""

    def __init__(self, adapter, prepared, method, warmup: int = 3):
        self.adapter = adapter
        lm = adapter.model
        self.embeds = prepared.inputs_embeds.clone()
        self.mask = prepared.attention_mask.clone()
        self.pos = adapter.position_ids(prepared).clone()  # the family's own (M-RoPE: 3-D; kept original ids)

        def fwd():
            return lm(inputs_embeds=self.embeds, attention_mask=self.mask, position_ids=self.pos, use_cache=False, logits_to_keep=1).logits

        self.fwd = fwd
        # in-LLM hooks run (as GPU kernels) during capture; replays re-execute those kernels, so the
        # hooks need not stay installed afterwards, but the tensors they built before the capture
        # (layouts, masks, rotary tables in the runner) must stay alive: keep the runner
        with adapter.llm_pruning(method, prepared) as self.runner:
            self.graph, self.out = capture_graph(fwd, warmup)

    def replay(self):
        self.graph.replay()
        return self.out


# ------------------------------------------------------------------ compiled prefill (+ CUDA graph)
@dataclass(frozen=True)
class CompileVariant:
    """How :class:`CompiledPrefill` compiles the LLM prefill (always ``dynamic=False``: shapes are fixed).

    ``scope="model"`` compiles the whole forward into one graph, so inductor may also fuse across
    layer boundaries (a residual add into the next layer's RMSNorm). ``scope="layers"`` compiles the
    decoder layer's ``forward`` once and runs it for every layer (regional compilation: about
    num_layers times less to compile; embeddings, rotary tables, final norm and lm_head stay eager).
    """

    name: str
    backend: str = "inductor"
    mode: str | None = None  # inductor mode; never a cudagraph one (the capture is ours, see CompiledPrefill)
    scope: str = "model"  # "model" | "layers"
    fullgraph: bool = True


COMPILE_VARIANTS: dict[str, CompileVariant] = {
    v.name: v
    for v in (
        CompileVariant("inductor"),
        CompileVariant("inductor-max-autotune", mode="max-autotune-no-cudagraphs"),
        CompileVariant("inductor-layers", scope="layers"),
        CompileVariant("inductor-max-autotune-layers", mode="max-autotune-no-cudagraphs", scope="layers"),
        # trace + functionalise without code generation: exercises the same path in fast CPU tests
        CompileVariant("aot_eager", backend="aot_eager"),
        CompileVariant("aot_eager-layers", backend="aot_eager", scope="layers"),
    )
}
# the whole-model graph: on the H100 (results/efficiency/probe_compiled_prefill_h100.csv) it ran at
# 1.42x the floor at 64 visual tokens, while the per-layer ("-layers") variants failed to capture there
# (torch 2.11: "operation failed due to a previous error during capture")
DEFAULT_COMPILE_VARIANT = "inductor"
# gross-error guard on the compiled logits vs eager, relative to max |eager logit| (fp16 fusion
# differences are ~1e-3 of it; a wrong mask or position is order 1)
COMPILED_GUARD_RTOL = 5e-2

_COMPILED: dict[tuple[str, Callable], Callable] = {}
# per model (held weakly): (variant, input shapes) -> seconds the first (compiling) call took
_FIRST_CALL_S: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, float]] = weakref.WeakKeyDictionary()
_RECOMPILE_LIMIT = 64


def _prefill_logits(model, embeds: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor:
    return model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=1).logits


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a plain causal LM (``model.model.layers``); a VLM's come from its adapter
    (``ModelAdapter.decoder_layers``), which :class:`CompiledPrefill` takes as ``layers``."""
    return getattr(model, "model", model).layers


def _compiled(fn: Callable, variant: CompileVariant) -> Callable:
    """One ``torch.compile`` wrapper per (variant, function), shared by every instance in the process.

    dynamo keeps one graph per input signature on the function's code object (guards pick it), so
    every later call with shapes already seen reuses it. It allows only ``recompile_limit`` graphs
    per code object (8 by default: a sweep over batch sizes x kept counts x variants exceeds it) and
    then silently runs eager, which would pass for a compiled time: the limit is raised and hitting
    it made an error.
    """
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), _RECOMPILE_LIMIT))
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True
    key = (variant.name, fn)
    if key not in _COMPILED:
        kw = {"mode": variant.mode} if variant.mode else {}
        _COMPILED[key] = torch.compile(fn, backend=variant.backend, fullgraph=variant.fullgraph, dynamic=False, **kw)
    return _COMPILED[key]


@contextlib.contextmanager
def _layer_forwards(layers: torch.nn.ModuleList, compiled: Callable):
    # an instance attribute shadows the class's forward; module hooks run in __call__, outside it
    for layer in layers:
        layer.forward = functools.partial(compiled, layer)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CompiledPrefill:
    """The LLM prefill of fixed inputs compiled with ``torch.compile``, captured in a CUDA graph on GPU.

    The forward is :class:`GraphPrefill`'s (``use_cache=False``, logits of the last position, positions
    from the mask). Calling the instance replays the graph (GPU) or runs the compiled forward (CPU,
    no graph; ``cuda_graph=False`` forces that on GPU too).

    * An all-ones mask is dropped on the host before compiling: transformers' eager SDPA path checks
      the mask and then uses ``is_causal``, but under tracing it cannot read the mask and would build
      a dense 4-D one (no flash kernel). Masks with padding are passed as they are.
    * The capture is manual (compiled with a non-cudagraph inductor mode, then
      ``torch.cuda.graph``), not ``mode="reduce-overhead"``: cudagraph trees own their outputs
      (overwritten by the next replay), re-record per new shape and fall back to no graph on some
      ops without failing. A manual capture is replayed and timed exactly like ``graph`` mode, so the
      two modes differ by the compilation only.
    * Compile cost: the first call per (model, variant, input shapes) compiles; instances with the
      same shapes (other methods at the same kept count) reuse it. ``compile_s`` is that first
      call's time (compile + one run), ``compile_reused`` whether this instance found it done.
    * ``in_llm`` methods are not handled: their hooks keep per-call Python state.
    * ``layers``: the decoder layers the ``layers`` scope compiles (a VLM's from its adapter,
      ``ModelAdapter.decoder_layers``); default: a plain causal LM's ``model.model.layers``.
    """

    def __init__(self, model, embeds: torch.Tensor, mask: torch.Tensor, variant: str | CompileVariant = DEFAULT_COMPILE_VARIANT, cuda_graph: bool | None = None, warmup: int = 3, position_ids: torch.Tensor | None = None, layers: torch.nn.ModuleList | None = None):
        self.variant = COMPILE_VARIANTS[variant] if isinstance(variant, str) else variant
        self.model = model
        self.device = embeds.device
        self.embeds = embeds.clone()
        self.full_mask = mask.clone()
        # the adapter's positions (``ModelAdapter.position_ids``) when given, else the mask's cumulative sum
        self.pos = (self.full_mask.long().cumsum(-1) - 1).clamp(min=0) if position_ids is None else position_ids.clone()
        self.mask = None if bool(self.full_mask.all()) else self.full_mask
        if self.variant.scope == "model":
            compiled = _compiled(_prefill_logits, self.variant)

            def fwd():
                return compiled(self.model, self.embeds, self.mask, self.pos)
        elif self.variant.scope == "layers":
            layers = decoder_layers(model) if layers is None else layers
            compiled = _compiled(type(layers[0]).forward, self.variant)

            def fwd():
                with _layer_forwards(layers, compiled):
                    return _prefill_logits(self.model, self.embeds, self.mask, self.pos)
        else:
            raise ValueError(f"unknown compile scope {self.variant.scope!r}")
        self.fwd = fwd
        key = (self.variant.name, tuple(embeds.shape), embeds.dtype, str(self.device), self.mask is None)
        first = _FIRST_CALL_S.setdefault(model, {})
        self.compile_reused = key in first
        _sync(self.device)
        t0 = time.perf_counter()
        out = fwd()
        _sync(self.device)
        first.setdefault(key, time.perf_counter() - t0)
        self.compile_s = first[key]
        self.graph = None
        self.out = out
        if self.device.type == "cuda" if cuda_graph is None else cuda_graph:
            self.graph, self.out = capture_graph(fwd, warmup)

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            return self.fwd()
        self.graph.replay()
        return self.out

    def eager_logits(self) -> torch.Tensor:
        """The uncompiled forward on the same inputs, with the mask as given."""
        return _prefill_logits(self.model, self.embeds, self.full_mask, self.pos)

    def check(self) -> dict[str, float]:
        """``max |compiled - eager|`` of the last-position logits and ``max |eager|`` (fp32)."""
        got = self().float()
        ref = self.eager_logits().float()
        return {"max_abs_diff_vs_eager": float((got - ref).abs().max()), "max_abs_eager": float(ref.abs().max())}


def _compiled_mode_variant(modes: tuple[str, ...]) -> str | None:
    """``compiled_graph`` (default variant) or ``compiled_graph:<variant>`` among ``modes``."""
    picked = [m for m in modes if m.split(":", 1)[0] == "compiled_graph"]
    if not picked:
        return None
    if len(picked) > 1:
        raise ValueError(f"one compiled_graph mode per run, got {picked}")
    variant = picked[0].split(":", 1)[1] if ":" in picked[0] else DEFAULT_COMPILE_VARIANT
    if variant not in COMPILE_VARIANTS:
        raise ValueError(f"unknown compile variant {variant!r}; known: {sorted(COMPILE_VARIANTS)}")
    return variant


def compiled_prefill_latency(adapter, method, prepared, warmup: int, repeats: int, variant: str) -> tuple[dict[str, Any], list[str]]:
    """``prefill_compiled_graph``: median/IQR of the replay, compile time and the check against eager."""
    device = adapter.device
    entry: dict[str, Any] = {**_t(None), "variant": variant, "compile_s": None, "compile_reused": None, "max_abs_diff_vs_eager": None, "max_abs_eager": None}
    if device.type != "cuda":
        return entry, ["prefill_compiled_graph is null: CUDA graphs need a GPU"]
    if method.stage == "in_llm":
        return entry, [f"prefill_compiled_graph is null: {method.name} prunes inside the LLM through hooks that keep per-call Python state; not compiled"]
    try:
        g = CompiledPrefill(adapter.model, prepared.inputs_embeds, prepared.attention_mask, variant, warmup=warmup, position_ids=adapter.position_ids(prepared), layers=adapter.decoder_layers)
        entry.update(compile_s=round(g.compile_s, 2), compile_reused=g.compile_reused, **g.check())
        timing = time_fn(g, device, warmup, repeats)
        del g
    except Exception as e:  # noqa: BLE001 - a failed compile or capture leaves the mode null, not the run
        return entry, [f"prefill_compiled_graph is null: compile or capture failed ({type(e).__name__}: {str(e)[:160]})"]
    if entry["max_abs_diff_vs_eager"] > COMPILED_GUARD_RTOL * entry["max_abs_eager"]:
        return entry, [f"prefill_compiled_graph is null: compiled logits differ from eager by {entry['max_abs_diff_vs_eager']:.3g} (max |logit| {entry['max_abs_eager']:.3g})"]
    entry.update(_t(timing))
    return entry, [f"prefill_compiled_graph: torch.compile variant {variant!r} (dynamic=False), then captured in a CUDA graph; compile_s is the first call on these shapes in this process"]


@torch.no_grad()
def stage_latencies(adapter, method, batch: dict[str, torch.Tensor], seeds: torch.Tensor, warmup: int = 3, repeats: int = 20, modes: tuple[str, ...] = ("eager", "graph")) -> tuple[dict[str, Any], list[str]]:
    """Time vision encoder, selection, LLM prefill (eager, graph, compiled_graph) and one decode step.

    ``modes``: any of ``eager``, ``graph``, ``compiled_graph`` (or ``compiled_graph:<variant>``, one
    of :data:`COMPILE_VARIANTS`).
    """
    device = adapter.device
    notes: list[str] = []
    out: dict[str, Any] = {}
    out["vision_encoder"] = _t(time_fn(lambda: adapter.vision_stage(batch), device, warmup, repeats))
    # selection alone, given the tower's outputs (ToMe merges inside the tower: timed as part of it)
    select = adapter.selection_stage(batch, method, seeds)
    if select is not None:
        out["selection"] = _t(time_fn(select, device, warmup, repeats))
        # what the adapter really runs on CUDA: extras + reduce replayed from a CUDA graph
        if adapter.replays_selection(method):
            needs = bool(method.needs)
            enc = adapter.encode_images(batch["pixel_values"], output_hidden_states=needs)
            feats, hidden = enc if needs else (enc, None)
            gs = adapter.graphed_selection(method)
            out["selection_graph"] = _t(time_fn(lambda: gs(feats, hidden), device, warmup, repeats))
            notes.append("selection: eager method.reduce (extras precomputed); selection_graph: extras + reduce replayed from a CUDA graph, as the adapter runs it")
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
    variant = _compiled_mode_variant(modes)
    if variant is not None:
        out["prefill_compiled_graph"], n = compiled_prefill_latency(adapter, method, prepared, warmup, repeats, variant)
        notes += n
    # decode steps after the (pruned) prefill, with the KV cache; in-LLM hooks stay installed so
    # every step attends over exactly the pruned prefix. Steps advance like generation does (each
    # one a new position), warm-up steps first; the median step is reported.
    with adapter.llm_pruning(method, prepared):
        first = adapter.prefill(prepared)
        cache = first.past_key_values
        tok = first.logits[:, -1:].argmax(-1)
        mask = prepared.attention_mask
        times: list[float] = []
        try:
            for step in range(warmup + repeats):
                mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
                pos = adapter.next_position_ids(prepared, step)
                t = time_fn(lambda: adapter.model(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True), device, warmup=0, repeats=1)
                if step >= warmup:
                    times.append(t.median_ms)
            import statistics

            q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
            med = statistics.median(times)
            # one new token per sample per step
            out["decode_step"] = {"median_ms": round(med, 4), "iqr_ms": round(q[2] - q[0], 4), "tokens_per_s": round(1000.0 * tok.shape[0] / med, 2)}
        except Exception as e:  # noqa: BLE001
            out["decode_step"] = {**_t(None), "tokens_per_s": None}
            notes.append(f"decode_step is null: {type(e).__name__}: {str(e)[:160]}")
    return out, notes

