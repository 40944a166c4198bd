"""TransPrune (Li et al., CVPR'26, https://arxiv.org/abs/2507.20630): token transition + instruction attention.

Official code: ``liaolea/TransPrune``, ``llava/model/modeling_llama_transprune.py``
(``LlamaModel.transprune_forward``, ``transprune_rank_drop``, ``LlamaDecoderLayer_TransPrune.compute_transf_weight``)
and its scripts (``--accmulating_layer_list [7..12] --pruning_layer_list [7,9,12]
--image_token_ratio_list [0.875,0.625,0.125]``). What it does (``shared/docs/methods.md`` 1 and 1b):

* *TTV* (token transition variation): for the attention and the FFN sublayer of every accumulating
  layer (rank ``r`` = layer ``r - 1`` for ``r`` in 7..12), ``(‖out‖ / ‖in‖) · softmax_seq(1 - cos(in, out))``
  with ``in`` the sublayer's normed input and ``out`` its output; the softmax runs over **all**
  tokens of the sequence (here: of the sample, padding excluded); the two are summed, and the
  per-token values accumulate over layers **without reset across stages** (carried over to the kept
  tokens at each stage);
* *IGA*: before layer ``ℓ`` (= rank), that layer's input norm, q/k projections and RoPE (current,
  renumbered positions) score the rows of **all tokens after the image**; head-mean, then
  query-mean, of their attention to the image tokens;
* both normalised to sum 1 over the image tokens (``+1e-8``); ``score = TTV + IGA``; keep
  ``int(N r_s)`` (``r = 0.875, 0.625, 0.125``: 504/360/72, 236.25 on average), sorted; positions
  renumbered (shifted by the dropped count when decoding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from methods.fastv import topk_sorted
from methods.inllm import InLLMMethod, Stage, StageOut, StageView, per_layer_counts, scale_layer, solve_monotone


def _transition_from_stats(n_in: torch.Tensor, n_out: torch.Tensor, dot: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``(..., T)`` TTV from per-token ``‖in‖``, ``‖out‖`` and ``in·out`` (fp32); softmax over ``valid`` tokens."""
    eps = 1e-8
    cos = dot / (n_in.clamp(min=eps) * n_out.clamp(min=eps))
    e = torch.exp(1 - cos)
    if valid is not None:
        e = e * valid
    return (n_out / n_in) * (e / e.sum(-1, keepdim=True))


def _token_stats(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """``(3, B, T)``: per-token ``‖in‖``, ``‖out‖``, ``in·out``, accumulated in fp32 (no fp16 overflow of the
    sums), written into one tensor so that the sublayers of a stage stack in one kernel."""
    st = x_in.new_empty((3, *x_in.shape[:-1]), dtype=torch.float32)
    torch.linalg.vector_norm(x_in, dim=-1, dtype=torch.float32, out=st[0])
    torch.linalg.vector_norm(x_out, dim=-1, dtype=torch.float32, out=st[1])
    torch.sum(x_in * x_out, dim=-1, dtype=torch.float32, out=st[2])
    return st


def transition_weight(x_in: torch.Tensor, x_out: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``(B, T)``: ``(‖out‖/‖in‖) · exp(1 - cos) / Σ_seq exp(1 - cos)`` (sum over each sample's valid tokens)."""
    return _transition_from_stats(*_token_stats(x_in, x_out), valid)


def _ttv_hook(kind: str, layer: int, runner, module, args, kwargs, output):
    """Forward hook on ``self_attn`` (``kind="attn"``) or ``mlp``: record the per-token statistics.

    Only the three reductions run here (4 kernels); the transition weights of every sublayer since
    the last stage are finished together, vectorised, by :func:`_flush_ttv` at the next stage.
    """
    if not runner.prefill:
        return None
    x_in = kwargs["hidden_states"] if kind == "attn" and "hidden_states" in kwargs else args[0]
    x_out = output[0] if isinstance(output, tuple) else output
    runner.state.setdefault("tp_pending", []).append(_token_stats(x_in, x_out))
    return None


def _flush_ttv(view) -> torch.Tensor | None:
    """Accumulated TTV ``(B, n_vis)`` on the current visual block (pending sublayers added), or None."""
    pending = view.state.pop("tp_pending", None)
    acc = view.state.get("tp_ttv")
    if pending:
        n_in, n_out, dot = torch.stack(pending, dim=1)  # (L, B, T) each
        valid = None if getattr(view, "no_padding", False) else view.valid
        w = view.visual(_transition_from_stats(n_in, n_out, dot, valid).sum(0), dim=1)
        acc = w if acc is None else acc + w
        view.state["tp_ttv"] = acc
    return acc


@dataclass
class TransPrune(InLLMMethod):
    """TransPrune: keep the visual tokens with the largest TTV + IGA, in three stages.

    Parameters
    ----------
    pruning_layer_list : list[int]
        Pruned layers (``rank_layer``: the input of that layer is pruned), for ``ref_layers`` = 32.
    accmulating_layer_list : list[int]
        Ranks whose layer (``rank - 1``) contributes TTV.
    image_token_ratio_list : list[float]
        Kept fraction of the original ``N`` after each stage (``int(N r)``); used as-is with ``budget: official``.
    budget : str
        ``layer_mean`` (default): the ratios scaled by one factor so the layer mean is
        ``round(N (1 - ratio))``; ``after_prune``: scaled so the first stage keeps that count;
        ``official``: the configured ratios.
    renumber_positions : bool
        Official: renumber (True).
    """

    pruning_layer_list: list[int] = field(default_factory=lambda: [7, 9, 12])
    accmulating_layer_list: list[int] = field(default_factory=lambda: [7, 8, 9, 10, 11, 12])
    image_token_ratio_list: list[float] = field(default_factory=lambda: [0.875, 0.625, 0.125])
    renumber_positions: bool = True

    @property
    def name(self) -> str:
        return "transprune"

    def layers_for(self, n_layers: int) -> list[int]:
        return [scale_layer(x, n_layers, self.ref_layers) for x in self.pruning_layer_list]

    def ttv_layers(self, n_layers: int) -> list[int]:
        last = max(self.layers_for(n_layers))
        return sorted({scale_layer(r, n_layers, self.ref_layers) - 1 for r in self.accmulating_layer_list} & set(range(last)))

    def counts(self, n_vis: int, n_layers: int) -> list[int]:
        ratios = [float(r) for r in self.image_token_ratio_list]
        layers = self.layers_for(n_layers)

        def make(alpha: float) -> list[int]:
            out, prev = [], n_vis
            for r in ratios:
                c = max(1, min(prev, int(round(n_vis * r * alpha, 9))))
                out.append(c)
                prev = c
            return out

        if self.budget == "official":
            return make(1.0)
        target = self.target(n_vis)
        if self.budget == "after_prune":
            alpha = target / (n_vis * ratios[0])
            out = make(alpha)
            out[0] = target
            for i in range(1, len(out)):
                out[i] = min(out[i], out[i - 1])
            return out

        def mean(alpha: float) -> float:
            return sum(per_layer_counts(list(zip(layers, make(alpha))), n_vis, n_layers)) / n_layers

        alpha = solve_monotone(mean, target, 0.0, 1.0 / min(ratios))
        self._warn_infeasible(mean(alpha), target, n_layers)
        return make(alpha)

    def plan(self, n_vis: int, n_layers: int) -> list[Stage]:
        if self.prune_ratio == 0.0 and self.budget != "official":
            return []
        return [Stage(layer, c, self.renumber_positions) for layer, c in zip(self.layers_for(n_layers), self.counts(n_vis, n_layers))]

    def install_hooks(self, lm, runner) -> list:
        handles = []
        for layer in self.ttv_layers(len(lm.layers)):
            dec = lm.layers[layer]
            handles.append(dec.self_attn.register_forward_hook(
                partial(runner.sub_hook, partial(_ttv_hook, "attn", layer)), with_kwargs=True))
            handles.append(dec.mlp.register_forward_hook(
                partial(runner.sub_hook, partial(_ttv_hook, "mlp", layer)), with_kwargs=True))
        return handles

    def prune(self, i: int, stage: Stage, view: StageView) -> StageOut:
        attn, q_valid = view.attn_rows(stage.layer, "after_image")  # (B, H, Q, T), layer ℓ on its input
        a = view.visual(attn.mean(1), dim=-1).float()  # (B, Q, n)
        if getattr(view, "uniform_start", False):  # every row lies after every sample's image
            iga = a.mean(1)
        else:
            w = q_valid.to(a.dtype)
            iga = (a * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)
        iga = iga / (iga.sum(1, keepdim=True) + 1e-8)
        ttv = _flush_ttv(view)
        score = iga
        if ttv is not None:
            score = score + ttv / (ttv.sum(1, keepdim=True) + 1e-8)
        keep = topk_sorted(score, stage.n_keep)
        if ttv is not None:
            view.state["tp_ttv"] = ttv.gather(1, keep)  # accumulated without reset: carried to the kept tokens
        return StageOut(keep)
