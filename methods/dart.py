"""DART (Wen et al., EMNLP'25, https://arxiv.org/abs/2502.11494): prune visual tokens by duplication.

Official code: ``ZichenWen1/DART``, ``llava/model/language_model/modeling_llama_self.py``
(``get_retained_image_token``). What it does (``docs/methods.md`` 1 and 1b):

* before layer ``K=2``: pivots are the top-4 image and top-4 text tokens (text = every token after
  the image) by the **L1 norm of layer K-1's post-RoPE keys**, heads concatenated;
* ``h = final RMSNorm(layer K-1 output)``; the pivots are visited in the iteration order of a
  Python ``set`` of their integer sequence positions, and each takes the ``floor(B/8)`` still
  unselected image tokens of **lowest cosine similarity** to it;
* keep image pivots + chosen tokens (``4 + 8 floor(B/8)``: 196/132/68 for B = 192/128/64), sorted,
  original position ids. No attention weights.

Sequence positions used for the set order are those of the unpadded sample (as in the batch-1
official code), so left padding does not change the order; :func:`methods.pyset.set_order` replays
CPython's set on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.dart_parts import dart_layout, key_l1_norms, pivot_counts, prompt_layout, stage_layout
from methods.fastv import one_stage_count
from methods.inllm import InLLMMethod, Stage, StageOut, StageView, scale_layer, visual_block
from methods.pyset import set_order


def dart_select(keys: torch.Tensor, hidden: torch.Tensor, valid: torch.Tensor, vis_start: torch.Tensor, n_vis: int,
                n_image_pivots: int, n_text_pivots: int, per_pivot: list[int], uniform_start: int | None = None,
                layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """DART's selection for a batch -> ``(B, n_image_pivots + sum(per_pivot))`` sorted indices into the visual block.

    ``keys`` ``(B, T, H*d)`` post-RoPE keys of layer ``K-1``, heads concatenated (or ``(B, T, H, d)``, any
    strides); ``hidden`` ``(B, T, D)`` the final-norm'd output of layer ``K-1``; ``valid`` ``(B, T)`` False on left
    padding; ``vis_start`` ``(B,)``: the image is ``[vis_start, vis_start + n_vis)``, text everything after it.
    ``per_pivot``: tokens each pivot takes, by visiting rank (``floor(B/8)`` each officially). ``uniform_start``:
    the (host) image start shared by every sample, if any (slices, not gathers); ``layout``: :func:`dart_layout`,
    precomputed. Batched, no host sync: CUDA-graph capturable.
    """
    t = keys.shape[1]
    text_bias, pad, img_offset = layout if layout is not None else dart_layout(valid, vis_start, n_vis)
    norms = key_l1_norms(keys)  # (B, T)
    img_norm = norms.narrow(1, uniform_start, n_vis) if uniform_start is not None else visual_block(norms, vis_start, n_vis)
    img_piv = img_norm.topk(n_image_pivots, dim=1).indices  # (B, pi), relative, by descending norm
    text_piv = (norms + text_bias).topk(n_text_pivots, dim=1).indices  # absolute
    # the official set order is over the unpadded sample's positions
    unpadded = torch.cat([img_piv + img_offset, text_piv - pad], dim=1)
    order = set_order(unpadded, t) + pad  # (B, P) absolute positions, visiting order
    # cosine similarity as F.cosine_similarity normalises (eps-clamped L2 norms, per token: normalising
    # every token once equals normalising the pivots and the visual block apart), all pivots in one matmul
    hidden = hidden / torch.linalg.vector_norm(hidden, dim=-1, keepdim=True).clamp_min(1e-8)
    vis_n = hidden.narrow(1, uniform_start, n_vis) if uniform_start is not None else visual_block(hidden, vis_start, n_vis)
    piv_n = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (B, P, D)
    return pivot_picks(piv_n @ vis_n.transpose(1, 2), img_piv, per_pivot)


def pivot_picks(cos: torch.Tensor, img_piv: torch.Tensor, per_pivot: list[int]) -> torch.Tensor:
    """DART's greedy picks: ``(B, P, N)`` similarities of the pivots (visiting order) to the visual tokens,
    ``(B, pi)`` image pivots (taken from the start) -> ``(B, pi + sum(per_pivot))`` sorted visual indices.

    Pivot ``j`` takes the ``per_pivot[j]`` untaken tokens of least similarity. Taken tokens are set to
    -inf in the later pivots' rows of ``-cos`` in place: one ``topk`` and one ``scatter_`` per pivot (no
    "taken" mask added to each row). The values ``topk`` sees equal those of ``-cos + taken`` (0 / -inf):
    ``0 - cos`` maps a +-0 similarity to +0 as adding the 0 mask would, ``x + 0 == x`` for every other
    x, and ``x + (-inf) == -inf`` for every finite x.
    """
    neg = torch.rsub(cos, 0)  # (B, P, N), a new tensor (scattered in place below)
    p = neg.shape[1]
    neg.scatter_(2, img_piv.unsqueeze(1).expand(-1, p, -1), float("-inf"))
    parts = [img_piv]
    last = max((j for j, cnt in enumerate(per_pivot) if cnt > 0), default=-1)
    for j, cnt in enumerate(per_pivot):
        if cnt <= 0:
            continue
        # the set is what matters (sorted below); an ordered topk would cost one more kernel
        top = neg[:, j].topk(cnt, dim=1, sorted=False).indices
        if j < last:
            neg[:, j + 1 :].scatter_(2, top.unsqueeze(1).expand(-1, p - j - 1, -1), float("-inf"))
        parts.append(top)
    return torch.cat(parts, dim=1).sort(dim=1).values


@dataclass
class DART(InLLMMethod):
    """DART: pivots by key L1 norm, keep the tokens least similar to each pivot.

    Parameters
    ----------
    k_layer : int
        Pruning layer ``K`` (scored on layer ``K-1`` outputs; scaled for shallow LLMs).
    pivot_image_token, pivot_text_token : int
        Pivots taken among image tokens / text tokens after the image.
    budget : str
        ``official`` (default): ``max_num_trunction = B = round(N (1 - ratio))`` and ``4 + 8 floor(B/8)``
        tokens kept after layer ``K`` (196 / 132 / 68 for 192 / 128 / 64: recorded as ``budget_met: false``
        with the count kept, a published table is not re-solved); ``after_prune``: exactly ``B`` kept (the
        remainder of ``(B - 4) / 8`` goes to the first visited pivots); ``layer_mean``: the kept count makes
        the mean over layers ``B``.
    renumber_positions : bool
        Renumber kept positions (off: original ids, as the official code).
    """

    k_layer: int = 2
    pivot_image_token: int = 4
    pivot_text_token: int = 4
    renumber_positions: bool = False

    capture_offsets: ClassVar[tuple[int, ...]] = (-1,)
    official_is_table: ClassVar[bool] = True

    def selection_flops(self, cost) -> int:
        """Keys come from the captured ``k_proj``; the ``N`` tokens' cosines to the 8 pivots are one matmul (``2 * 8 * N * D``)."""
        if self.prune_ratio == 0.0:
            return 0
        return cost.batch * 2 * (self.pivot_image_token + self.pivot_text_token) * cost.n_visual * cost.llm_width

    def layers_for(self, n_layers: int) -> list[int]:
        return [scale_layer(self.k_layer, n_layers, self.ref_layers)]

    def plan(self, n_vis: int, n_layers: int) -> list[Stage]:
        if self.prune_ratio == 0.0:
            return []
        (layer,) = self.layers_for(n_layers)
        target = self.target(n_vis)
        piv = self.pivot_image_token + self.pivot_text_token
        if self.budget == "official":
            keep = self.pivot_image_token + piv * (target // piv)
        else:
            keep = one_stage_count(self.budget, target, n_vis, layer, n_layers)
        keep = max(self.pivot_image_token, min(n_vis, keep))
        if self.budget == "layer_mean":
            self._warn_infeasible((layer * n_vis + (n_layers - layer) * keep) / n_layers, target, n_layers)
        return [Stage(layer, keep, self.renumber_positions)]

    def prune(self, i: int, stage: Stage, view: StageView) -> StageOut:
        keys = view.keys(stage.layer - 1, heads_first=False)  # (B, T, Hkv, d), heads concatenated in dart_select
        hidden = view.final_norm(view.hidden)
        counts = pivot_counts(stage.n_keep, self.pivot_image_token + self.pivot_text_token, self.pivot_image_token)
        keep = dart_select(keys, hidden, view.valid, view.vis_start, view.n_vis,
                           self.pivot_image_token, self.pivot_text_token, counts,
                           view.vis_start_min if getattr(view, "uniform_start", False) else None, stage_layout(view))
        return StageOut(keep)

    def runtime_setup(self, plan: list[Stage], prepared, device) -> dict:
        """:func:`dart_layout` of the prompt, built once outside the forward (DART prunes the original sequence)."""
        return {"layout": prompt_layout(prepared, device)} if plan else {}
