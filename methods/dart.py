"""DART (Wen et al., EMNLP'25, https://arxiv.org/abs/2502.11494): prune visual tokens by duplication.

Official code: ``ZichenWen1/DART``, ``llava/model/language_model/modeling_llama_self.py``
(``get_retained_image_token``). What it does (``shared/docs/methods.md`` 1 and 1b):

* before layer ``K=2``: pivots are the top-4 image and top-4 text tokens (text = every token after
  the image) by the **L1 norm of layer K-1's post-RoPE keys**, heads concatenated;
* ``h = final RMSNorm(layer K-1 output)``; the pivots are visited in the iteration order of a
  Python ``set`` of their integer sequence positions, and each takes the ``floor(B/8)`` still
  unselected image tokens of **lowest cosine similarity** to it;
* keep image pivots + chosen tokens (``4 + 8 floor(B/8)``: 196/132/68 for B = 192/128/64), sorted,
  original position ids. No attention weights.

Sequence positions used for the set order are those of the unpadded sample (as in the batch-1
official code), so left padding does not change the order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from methods.fastv import one_stage_count
from methods.inllm import InLLMMethod, Stage, StageOut, StageView, scale_layer, visual_block


def pivot_order(image_pos: list[int], text_pos: list[int]) -> list[int]:
    """The official visiting order: ``list(set(image_pos + text_pos))`` (CPython set iteration)."""
    return list(set(image_pos + text_pos))


def dart_select(
    keys: torch.Tensor,
    hidden: torch.Tensor,
    valid: torch.Tensor,
    vis_start: torch.Tensor,
    n_vis: int,
    n_image_pivots: int,
    n_text_pivots: int,
    per_pivot: list[int],
) -> torch.Tensor:
    """DART's selection for a batch.

    Parameters
    ----------
    keys : torch.Tensor
        ``(B, T, H*d)`` post-RoPE keys of layer ``K-1`` with heads concatenated.
    hidden : torch.Tensor
        ``(B, T, D)`` final-norm'd output of layer ``K-1``.
    valid : torch.BoolTensor
        ``(B, T)``, False on left padding.
    vis_start : torch.LongTensor
        ``(B,)``; the image is ``[vis_start, vis_start + n_vis)``, text is everything after it.
    n_vis, n_image_pivots, n_text_pivots : int
    per_pivot : list[int]
        Tokens each pivot takes, by visiting rank (``floor(B/8)`` each in the official setting).

    Returns
    -------
    torch.LongTensor
        ``(B, n_image_pivots + sum(per_pivot))`` sorted indices into the visual block.
    """
    b, t, _ = keys.shape
    dev = keys.device
    norms = keys.float().abs().sum(-1)  # L1 norm, (B, T)
    img_norm = visual_block(norms, vis_start, n_vis)
    img_piv = img_norm.topk(n_image_pivots, dim=1).indices  # (B, pi), relative
    pos = torch.arange(t, device=dev).view(1, t)
    is_text = (pos >= (vis_start + n_vis).view(-1, 1)) & valid
    text_piv = norms.masked_fill(~is_text, float("-inf")).topk(n_text_pivots, dim=1).indices  # absolute
    pad = (~valid).sum(1)
    # official set order on unpadded positions (a few ints per sample)
    img_abs = (img_piv + vis_start.view(-1, 1) - pad.view(-1, 1)).tolist()
    txt_abs = (text_piv - pad.view(-1, 1)).tolist()
    order = torch.tensor([pivot_order(i, x) for i, x in zip(img_abs, txt_abs)], device=dev) + pad.view(-1, 1)
    vis_h = visual_block(hidden, vis_start, n_vis)  # (B, N, D)
    avail = torch.ones(b, n_vis, dtype=torch.bool, device=dev)
    avail.scatter_(1, img_piv, False)
    for j, cnt in enumerate(per_pivot):
        if cnt <= 0:
            continue
        piv = hidden.gather(1, order[:, j].view(b, 1, 1).expand(-1, 1, hidden.shape[-1]))  # (B, 1, D)
        neg_cos = -F.cosine_similarity(piv, vis_h, dim=-1)
        top = neg_cos.masked_fill(~avail, float("-inf")).topk(cnt, dim=1).indices
        avail.scatter_(1, top, False)
    keep_n = n_image_pivots + sum(max(c, 0) for c in per_pivot)
    return torch.arange(n_vis, device=dev).expand(b, n_vis)[~avail].view(b, keep_n)


def pivot_counts(n_keep: int, n_pivots: int, n_image_pivots: int) -> list[int]:
    """Per-pivot counts so that ``n_image_pivots + sum == n_keep`` (remainder to the first visited)."""
    rest = max(n_keep - n_image_pivots, 0)
    base, extra = divmod(rest, n_pivots)
    return [base + (1 if j < extra else 0) for j in range(n_pivots)]


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
        ``official``: ``max_num_trunction = round(N (1 - ratio))`` and ``4 + 8 floor(B/8)`` tokens
        kept; ``after_prune``: exactly ``B`` kept (the remainder of ``(B - 4) / 8`` goes to the first
        visited pivots); ``layer_mean`` (default): the kept count makes the 32-layer mean equal ``B``.
    renumber_positions : bool
        Renumber kept positions (off: original ids, as the official code).
    """

    k_layer: int = 2
    pivot_image_token: int = 4
    pivot_text_token: int = 4
    renumber_positions: bool = False

    capture_offsets: ClassVar[tuple[int, ...]] = (-1,)

    @property
    def name(self) -> str:
        return "dart"

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
        keys = view.keys(stage.layer - 1)  # (B, Hkv, T, d)
        b, _, t, _ = keys.shape
        keys = keys.transpose(1, 2).reshape(b, t, -1)
        hidden = view.final_norm(view.hidden)
        counts = pivot_counts(stage.n_keep, self.pivot_image_token + self.pivot_text_token, self.pivot_image_token)
        keep = dart_select(keys, hidden, view.valid, view.vis_start, view.n_vis,
                           self.pivot_image_token, self.pivot_text_token, counts)
        return StageOut(keep)
