"""FLOPs: counted (``FlopCounterMode``) and analytic (per architecture, following the tokens that
are actually present at every layer).

All numbers are FLOPs = 2 x multiply-adds, counting matrix products only (projections, attention's
``QK^T`` and ``AV`` over the full square, as SDPA computes it, MLPs, the patch-embedding convolution,
``lm_head``) — the same operations ``torch.utils.flop_counter`` counts, so the two can be compared
exactly. Norms, softmax, activations and RoPE are not counted by either.

``paper_convention`` gives the number most papers print instead (FastV section 4.2, reused by DART,
DivPrune and VisionZip): ``4nd^2 + 2n^2d + 2ndm`` multiply-adds per LLM layer, LLM only, with a
2-matrix MLP. It under-counts LLaMA's 3-matrix SwiGLU MLP and omits the vision tower, the projector,
``lm_head`` and selection; it is reported so published numbers can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.utils import flop_counter as _fc
from torch.utils.flop_counter import FlopCounterMode

_REGISTERED = False


def _register_cpu_sdpa() -> None:
    """torch has no FLOP formula for the CPU flash-attention kernel, so CPU counts silently missed
    every attention product; register the same formula the CUDA kernels use."""
    global _REGISTERED
    if _REGISTERED:
        return
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op.default not in _fc.flop_registry:

        @_fc.register_flop_formula(op)
        def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return _fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    _REGISTERED = True


def counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts CPU SDPA attention."""
    _register_cpu_sdpa()
    return FlopCounterMode(display=False)


def count_flops(fn: Callable[[], object]) -> tuple[int, object]:
    """Run ``fn`` under the counter; returns ``(flops, fn's result)``."""
    with counter() as c:
        out = fn()
    return c.get_total_flops(), out


@dataclass
class Breakdown:
    """Analytic FLOPs of one sample's forward, by part (2 x multiply-adds)."""

    vision: int = 0
    projector: int = 0
    selection: int = 0
    llm: int = 0
    lm_head: int = 0
    per_llm_layer: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.selection + self.llm + self.lm_head

    def as_dict(self) -> dict[str, float]:
        return {"vision": self.vision, "projector": self.projector, "selection": self.selection, "llm": self.llm, "lm_head": self.lm_head, "total": self.total}


def _vision_flops(vc, tokens_per_layer: Sequence[int] | None = None) -> int:
    """CLIP tower: patch embedding + every encoder layer (HF runs all of them, feature layer or not)."""
    d, m = vc.hidden_size, vc.intermediate_size
    grid = (vc.image_size // vc.patch_size) ** 2
    macs = grid * vc.num_channels * vc.patch_size**2 * d
    n_layers = vc.num_hidden_layers
    tokens = list(tokens_per_layer) if tokens_per_layer is not None else [grid + 1] * n_layers
    for n in tokens:
        macs += 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    return 2 * macs


def _llm_layer_macs(tc, s: int, ctx: int | None = None) -> int:
    """One Llama decoder layer on ``s`` new tokens attending over ``ctx`` keys (``ctx = s`` in prefill)."""
    d, m = tc.hidden_size, tc.intermediate_size
    head_dim = getattr(tc, "head_dim", None) or d // tc.num_attention_heads
    q_dim = tc.num_attention_heads * head_dim
    kv_dim = tc.num_key_value_heads * head_dim
    ctx = s if ctx is None else ctx
    proj = s * d * q_dim + 2 * s * d * kv_dim + s * q_dim * d
    attn = 2 * s * ctx * q_dim
    mlp = 3 * s * d * m  # SwiGLU: gate, up, down
    return proj + attn + mlp


def analytic_prefill(config, text_tokens: int, visual_per_layer: Sequence[int], n_visual_in: int | None = None, selection_flops: int = 0, logits_positions: int = 1, vision_tokens_per_layer: Sequence[int] | None = None) -> Breakdown:
    """FLOPs of one sample's prefill for a LLaVA-style config.

    Parameters
    ----------
    config : LlavaConfig
    text_tokens : int
        Non-visual tokens of the prompt (system, question, template).
    visual_per_layer : sequence of int
        Visual tokens entering each LLM decoder layer (length ``num_hidden_layers``).
    n_visual_in : int, optional
        Visual tokens the projector maps (576 for LLaVA-1.5); default: the full grid.
    selection_flops : int
        The method's own scoring/selection cost.
    logits_positions : int
        Positions ``lm_head`` is applied to (1 in generation's prefill).
    vision_tokens_per_layer : sequence of int, optional
        Tokens in each CLIP layer when a method merges inside the tower (ToMe).
    """
    vc, tc = config.vision_config, config.text_config
    grid = (vc.image_size // vc.patch_size) ** 2
    n_in = grid if n_visual_in is None else n_visual_in
    if len(visual_per_layer) != tc.num_hidden_layers:
        raise ValueError(f"visual_per_layer has {len(visual_per_layer)} entries for {tc.num_hidden_layers} layers")
    b = Breakdown()
    b.vision = _vision_flops(vc, vision_tokens_per_layer)
    b.projector = 2 * n_in * (vc.hidden_size * tc.hidden_size + tc.hidden_size * tc.hidden_size)
    b.selection = int(selection_flops)
    b.per_llm_layer = [2 * _llm_layer_macs(tc, text_tokens + int(v)) for v in visual_per_layer]
    b.llm = sum(b.per_llm_layer)
    b.lm_head = 2 * logits_positions * tc.hidden_size * tc.vocab_size
    return b


def analytic_decode(config, cache_per_layer: Sequence[int], new_tokens: int) -> int:
    """FLOPs of generating ``new_tokens`` after a prefill that left ``cache_per_layer`` keys per layer."""
    tc = config.text_config
    total = 0
    for step in range(new_tokens):
        for ctx in cache_per_layer:
            total += 2 * _llm_layer_macs(tc, 1, ctx + step + 1)
        total += 2 * tc.hidden_size * tc.vocab_size
    return total


def paper_convention(config, text_tokens: int, visual_per_layer: Sequence[int]) -> int:
    """FastV's per-layer ``4nd^2 + 2n^2d + 2ndm`` multiply-adds summed over LLM layers, x2 for FLOPs."""
    tc = config.text_config
    d, m = tc.hidden_size, tc.intermediate_size
    total = 0
    for v in visual_per_layer:
        n = text_tokens + int(v)
        total += 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    return 2 * total
