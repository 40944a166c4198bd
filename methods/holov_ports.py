"""HoloV's Qwen2.5-VL port (no [CLS]): its scores, chunk count, check and cost, in plain torch arithmetic.

It follows the official ``qwen-model-HoloV/modeling_qwen2_5_vl.py`` + ``utils.py`` (the tower has no
[CLS]): the same rule on the merged (2x2 merger) tokens, with two substitutes the official port computes,
both given by the adapter, never by this file:

* the attention score of a merged token is the attention each patch *receives* in the tower's last block
  (head mean, then mean over all query patches: the column mean), averaged over the 2x2 patches it merges
  (``VisionContext`` key ``merged_attn_received:<order>``, ``(B, N)``);
* the chunk count is ``max(1, int(1024 / 576 * N / T))`` (official ``num_patches``; 16 for 576 -> 64),
  ``qwen_chunks: official``; ``qwen_chunks: fixed`` uses ``chunks`` instead.

The official port keeps those scores in the tower's *window-attention order* while the merged tokens are
in raster order (it reverses the window permutation for the features only), so chunk ``c``'s tokens are
ranked by the scores of other tokens whenever the image spans more than one 112 px window. That is the
faithful default (``qwen_order: window``); ``qwen_order: raster`` is the named correction (each token its own
score). Not reproduced (recorded in :attr:`HoloV.deviations`): the official port slices the image block from
``<|vision_start|>`` (one token early: the marker is a candidate and the last image token always stays) and
floors the budget (``int(N * keep)``); here the block is the image tokens and ``T`` is the harness's ``round``.

The rule is :func:`methods.holov.holov_select`, unchanged; the scores come from the adapter (``bench/models/``).
"""

from __future__ import annotations

from typing import ClassVar

from bench.errors import IncompatibleMethodError


def qwen_chunk_count(n: int, t: int) -> int:
    """The official port's ``num_patches = max(1, int(1024 / 576 * n / t))`` for ``n`` merged tokens and budget ``t``
    (16 for 576 -> 64)."""
    return max(1, int(((1024 / 576) * n) / t))


def received_attention_flops(cost) -> int:
    """Per image: the last tower block's ``q, k, v`` recomputed and its ``L x L`` scores over the ``L = m^2 N``
    patches (the received-attention score that replaces [CLS])."""
    patches, w = cost.n_visual * getattr(cost, "vision_merge", 2) ** 2, cost.vision_width
    return 2 * patches * w * 3 * w + 2 * patches * patches * w


class HoloVQwenPort:
    """The no-[CLS] port's check, chunk count and recorded deviations, mixed into :class:`methods.holov.HoloV`
    (whose ``qwen_order`` / ``qwen_chunks`` fields choose the port's settings)."""

    #: the no-[CLS] substitute (Qwen2.5-VL's official port), served by the adapter
    NO_CLS_SCORE: ClassVar[str] = "merged_attn_received"
    deviations: ClassVar[tuple[str, ...]] = (
        ("qwen_block_slice (Qwen2.5-VL runs only): the official Qwen2.5-VL port cuts the image block from <|vision_start|> (one token early: the "
         "marker is a candidate, the last image token is always kept); here the block is exactly the image tokens"),
        "qwen_budget_rounding (Qwen2.5-VL runs only): the official Qwen2.5-VL port keeps int(N * keep) tokens; here round(N * (1 - ratio))",
    )

    def check_compatible(self, ctx) -> None:
        """A tower without [CLS] is accepted only where the adapter serves the official port's substitute."""
        if not ctx.has_cls and self.NO_CLS_SCORE + ":" + self.qwen_order not in ctx.extras:
            raise IncompatibleMethodError(
                f"method {self.name!r} scores by CLS attention, but this vision tower has no CLS token "
                "(and the adapter does not serve HoloV's official no-CLS substitute)"
            )

    def attention(self, ctx):
        """``(B, N)`` fp32 token scores: the head-mean CLS attention of ``layer`` (official LLaVA code), or without a
        [CLS] the port's received attention in ``qwen_order``."""
        if ctx.has_cls:
            return ctx.get(f"cls_attn:{self.layer}")[:, :, 1:].mean(dim=1).float()
        return ctx.get(f"{self.NO_CLS_SCORE}:{self.qwen_order}").float()

    def n_chunks(self, n: int, t: int, has_cls: bool) -> int:
        """Chunks for ``n`` tokens and budget ``t``: ``chunks`` with a [CLS] tower (official LLaVA code); the official
        Qwen2.5-VL port's ``max(1, int(1024 / 576 * n / t))`` without one (``qwen_chunks: official``)."""
        if has_cls or self.qwen_chunks == "fixed":
            return int(self.chunks)
        return qwen_chunk_count(n, t)
