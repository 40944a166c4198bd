"""TransPrune's plumbing: the forward hooks that keep each TTV sublayer's input and output for the stage that
reads them (:meth:`methods.transprune.TransPrune.install_hooks`; the runner is :mod:`bench.models.llm_pruning`)."""

from __future__ import annotations

from functools import partial


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
