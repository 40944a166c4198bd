"""TransPrune's plumbing (:mod:`methods.transprune`): the forward hooks that keep each TTV sublayer's input and
output for the stage that reads them (the runner is :mod:`bench.models.llm_pruning`), the per-token statistics
the TTV is computed from (fast path: :mod:`kernels.transprune`), and the stage counts under the budget modes."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from kernels import HALF, fast_path
from methods.inllm import layer_mean, solve_layer_mean


def _ttv_hook(kind: str, slot: tuple[int, int, int], runner, module, args, kwargs, output):
    """Forward hook on ``self_attn`` (``kind="attn"``) or ``mlp``: keep the sublayer's input and output.

    ``slot = (stage layer, index, count)``: the pair goes to entry ``index`` of that stage's list (the
    decoder layer never writes into these tensors); the stage computes the statistics of all of its
    sublayers at once (:func:`sublayer_stats`).
    """
    if not runner.prefill:
        return
    x_in = kwargs["hidden_states"] if kind == "attn" and "hidden_states" in kwargs else args[0]
    x_out = output[0] if isinstance(output, tuple) else output
    layer, j, count = slot
    runner.state.setdefault(("tp_io", layer), [None] * count)[j] = (x_in, x_out)


def install_ttv_hooks(lm, runner, ttv_layers: list[int], stage_layers: list[int]) -> list:
    """Forward hooks on ``self_attn`` and ``mlp`` of every TTV layer of ``lm``: each stage gets the sublayers since the
    previous one (``runner.state[("tp_io", stage layer)]``, filled during the prefill). Returns the hook handles."""
    stages = sorted(set(stage_layers))
    groups: dict[int, list[int]] = {}  # stage layer -> the TTV layers it finishes (those since the last stage)
    for layer in ttv_layers:
        groups.setdefault(min(s for s in stages if s > layer), []).append(layer)
    handles = []
    for stage_layer, members in groups.items():
        for pos, layer in enumerate(members):
            dec = lm.layers[layer]
            for sub, (kind, mod) in enumerate((("attn", dec.self_attn), ("mlp", dec.mlp))):
                slot = (stage_layer, 2 * pos + sub, 2 * len(members))
                hook = partial(runner.sub_hook, partial(_ttv_hook, kind, slot))
                handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    return handles


def token_stats(x_in: torch.Tensor, x_out: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(3, B, T)``: per-token ``‖in‖``, ``‖out‖``, ``in·out`` in fp32 (products and sums: no fp16 overflow,
    and the same arithmetic as the Triton kernel); written into ``out`` (a ``(3, B, T)`` fp32 slot of the
    stage's statistics buffer) when given."""
    st = x_in.new_empty((3, *x_in.shape[:-1]), dtype=torch.float32) if out is None else out
    torch.linalg.vector_norm(x_in, dim=-1, dtype=torch.float32, out=st[0])
    torch.linalg.vector_norm(x_out, dim=-1, dtype=torch.float32, out=st[1])
    torch.sum(x_in.float() * x_out.float(), dim=-1, out=st[2])  # .float(): a no-op on fp32 (CPU tests)
    return st


@fast_path("kernels.transprune:sublayer_stats", on=("pairs",), auto_dtypes=HALF)
def sublayer_stats(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``(3, L, B, T)``: :func:`token_stats` of the ``L`` (input, output) pairs of ``(B, T, D)`` sublayer tensors."""
    x0 = pairs[0][0]
    stats = x0.new_empty((3, len(pairs), *x0.shape[:-1]), dtype=torch.float32)
    for j, (x_in, x_out) in enumerate(pairs):
        token_stats(x_in, x_out, out=stats[:, j])
    return stats


def stage_counts(ratios: list[float], layers: list[int], n_vis: int, n_layers: int, target: int, budget: str,
                 warn: Callable[[float, float, int], None]) -> list[int]:
    """Kept counts per stage (``int(N r)``): the published ``ratios`` as they are where their layer mean meets
    ``target`` (``budget: official``, 236 of 576), else scaled by one factor so that the layer mean (``official``,
    ``layer_mean``) or the first stage (``after_prune``) is ``target``; ``warn(achieved, target, n_layers)`` where
    no factor reaches it."""
    def make(alpha: float) -> list[int]:
        out, prev = [], n_vis
        for r in ratios:
            c = max(1, min(prev, int(round(n_vis * r * alpha, 9))))
            out.append(c)
            prev = c
        return out

    if budget == "official" and abs(layer_mean(list(zip(layers, make(1.0))), n_vis, n_layers) - target) <= 1.0:
        return make(1.0)
    if budget == "after_prune":
        out = make(target / (n_vis * ratios[0]))
        out[0] = target
        for i in range(1, len(out)):
            out[i] = min(out[i], out[i - 1])
        return out
    alpha = solve_layer_mean(make, layers, n_vis, n_layers, target, 1.0 / min(ratios))
    warn(layer_mean(list(zip(layers, make(alpha))), n_vis, n_layers), target, n_layers)
    return make(alpha)
