"""VScan's Qwen2.5-VL port (``port: qwen25vl``): its scans and its budget, in plain torch.

Follows ``VScan/qwen/model/qwen2_5_vl_custom.py`` + ``qwen2_5_vl_utils.py`` (``auto`` resolves to this port when
the Qwen2.5-VL adapter accepts the method; the rule itself is :class:`methods.vscan.VScan`):

* **scores** (no [CLS]): the attention each patch *receives* (head sum, mean over all query patches) in the
  tower's first full-attention block (*local* scan, block 7 of 32) and its last block (*global*), averaged
  over the 2x2 patches of each merged token and reordered to raster order; served by the adapter
  (``merged_attn_received@first_full:raster``, ``merged_attn_received:raster``);
* **budget**: ``K = int(image_token_ratio * N)`` merged tokens (official ``0.167``), ``K // 2`` local and
  ``K - K // 2`` global;
* **local scan** (``window_selection``): ``4 x 4`` windows of merged tokens (``H // 4`` by ``W // 4``; the rows and
  columns past the last full window belong to it); tokens are visited by descending local score and a token is
  taken while its window holds fewer than ``ceil(K_local / windows)``, until ``K // 2`` are taken;
* **global scan**: the local picks' global score set to 0, then ``topk(K - K // 2)``; kept tokens sorted, the
  dropped ones merged into them (the same ``token_merging``); kept tokens keep their 3-D M-RoPE positions;
* **second stage** (``layer_list = [14]`` of 28, ``image_token_ratio_list = [0.333]``): before layer 14 runs, its
  ``input_layernorm``, ``q_proj``/``k_proj`` *without RoPE* (the official rotation is commented out) give the
  last token's ``softmax(q K^T / sqrt(d))`` (fp32, cast back), head mean over the image tokens;
  ``topk(int(0.333 * n))``, sorted; the kept tokens keep their original positions (no renumbering).

``budget: official`` runs ``0.167`` / ``[0.333]`` as given; ``layer_mean`` (default) scales the pre-LLM ratio so that
the nominal layer mean (``K`` before layer 14, ``int(0.333 K)`` after) is ``round(N (1 - ratio))``; ``after_prune``:
``K = round(N (1 - ratio))``. The head sum of the scores is computed as a head mean (the same ranking). Port
differences: a stage keeps at least one token (the official ``int(0.333 n)`` drops every image token when
``n < 4``); a merged grid smaller than one ``4 x 4`` window is refused (the official loop divides by zero windows).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from bench.errors import ConfigError, IncompatibleMethodError
from methods.holov_ports import received_attention_flops
from methods.inllm import per_layer_counts, scale_layer


def window_greedy_picks(attn: torch.Tensor, grid: tuple[int, int], k: int, window: int) -> torch.Tensor:
    """Local scan of the Qwen2.5-VL port (official ``window_selection``): ``(B, N)`` scores -> ``(B, k)`` raster
    indices in visiting order (descending score; stable on ties).

    Windows are ``window x window`` tokens, ``H // window`` by ``W // window`` of them, the leftover rows and
    columns joining the last window of their row / column; a token is taken while its window holds fewer than
    ``ceil(k / windows)``. Whether a token is taken depends only on the tokens of its window visited before it,
    so the greedy loop is the first ``k`` tokens, in visiting order, of rank ``< limit`` inside their window.
    """
    b, n = attn.shape
    h, w = grid
    wh, ww = h // window, w // window
    order = attn.argsort(dim=1, descending=True, stable=True)  # (B, N)
    wid = (order // w // window).clamp(max=wh - 1) * ww + (order % w // window).clamp(max=ww - 1)
    onehot = F.one_hot(wid, wh * ww)  # (B, N, W)
    rank = (onehot.cumsum(dim=1) * onehot).sum(dim=-1) - 1  # visits of the token's window up to it, minus one
    limit = math.ceil(k / (wh * ww))
    pos = (rank >= limit).to(torch.int8).sort(dim=1, stable=True).indices[:, :k]
    return order.gather(1, pos)


def vscan_qwen_keep_mask(local: torch.Tensor, glob: torch.Tensor, grid: tuple[int, int], budget: int, window: int = 4) -> torch.Tensor:
    """Qwen2.5-VL port's scans: ``(B, N)`` local and global received attention -> ``(B, N)`` kept mask
    (``budget // 2`` by :func:`window_greedy_picks`, then the ``budget - budget // 2`` best global scores with
    the local picks zeroed)."""
    picks_local = window_greedy_picks(local, grid, budget // 2, window)
    glob = glob.scatter(1, picks_local, 0)
    picks = torch.cat([picks_local, glob.topk(budget - budget // 2, dim=1).indices], dim=1)
    return torch.zeros_like(local, dtype=torch.bool).scatter(1, picks, True)


class VScanQwenPort:
    """The Qwen2.5-VL port's budget and costs, mixed into :class:`methods.vscan.VScan` (whose ``qwen_*`` fields
    hold the official settings)."""

    #: the Qwen2.5-VL port's scores, served by the adapter
    QWEN_NEEDS: ClassVar[tuple[str, ...]] = ("merged_attn_received@first_full:raster", "merged_attn_received:raster")

    @property
    def qwen(self) -> bool:
        """Whether the Qwen2.5-VL port's rule runs (``port: qwen25vl``)."""
        return self.port == "qwen25vl"

    @property
    def needs(self) -> frozenset[str]:
        """The port's scores: the two CLS rows (``llava``) or the adapter's received attention (``qwen25vl``)."""
        if self.qwen:
            return frozenset(self.QWEN_NEEDS)
        return frozenset({f"cls_attn:{self.shallow_layer}", f"cls_attn:{self.deep_layer}"})

    def check_compatible(self, ctx) -> None:
        """The LLaVA rule needs a [CLS] tower; the Qwen2.5-VL port a tower without one whose adapter serves its scores."""
        if not self.qwen:
            return super().check_compatible(ctx)
        if ctx.has_cls or any(k not in ctx.extras for k in self.QWEN_NEEDS):
            raise IncompatibleMethodError(
                f"method {self.name!r} with port=qwen25vl runs on Qwen2.5-VL's tower only (received-attention scores, no [CLS])")

    def check_qwen_settings(self) -> None:
        if len(self.qwen_layer_list) != len(self.qwen_image_token_ratio_list) or not self.qwen_layer_list:
            raise ConfigError("vscan: qwen_layer_list and qwen_image_token_ratio_list need one ratio per layer")
        if not 0.0 < float(self.qwen_image_token_ratio) <= 1.0 or any(not 0.0 < float(r) <= 1.0 for r in self.qwen_image_token_ratio_list):
            raise ConfigError("vscan: the Qwen2.5-VL port's ratios must be in (0, 1]")

    def qwen_layers(self, n_layers: int) -> list[int]:
        return [scale_layer(x, n_layers, int(self.qwen_ref_layers)) for x in self.qwen_layer_list]

    def qwen_stage_counts(self, k: int) -> list[int]:
        """Official ``next = int(ratio * current)`` per stage, from ``k`` tokens entering the LLM."""
        out, cur = [], k
        for r in self.qwen_image_token_ratio_list:
            cur = int(float(r) * cur)
            out.append(cur)
        return out

    def qwen_pre_count(self, n: int) -> int:
        """``K`` merged tokens kept before the LLM out of ``n`` (module docstring, ``budget``)."""
        if self.budget == "official":
            return max(1, int(float(self.qwen_image_token_ratio) * n))
        target = self.target(n)
        if self.budget == "after_prune":
            return max(1, min(n, target))
        # layer_mean: the pre-LLM ratio scaled so that the nominal layer mean of the official schedule is the target
        n_layers = int(self.qwen_ref_layers)
        layers = self.qwen_layers(n_layers)
        frac = [1.0]
        for r in self.qwen_image_token_ratio_list:
            frac.append(frac[-1] * float(r))
        mean_per_token = sum(per_layer_counts(list(zip(layers, frac[1:])), 1.0, n_layers)) / n_layers
        k = max(1, min(n, round(target / mean_per_token)))
        mean = sum(per_layer_counts(list(zip(layers, self.qwen_stage_counts(k))), k, n_layers)) / n_layers
        self._warn_infeasible(mean, target, n_layers)
        return k

    @staticmethod
    def qwen_tower_flops(cost) -> int:
        """Two tower blocks' ``q, k, v`` recomputed and their ``L x L`` scores (``L = m^2 N`` patches), per batch."""
        blocks = getattr(cost, "received_attention_blocks", 2)  # one where the first full-attention block is the last
        return cost.batch * blocks * received_attention_flops(cost)
