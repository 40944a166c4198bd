"""HoloV's Qwen2.5-VL port: its chunk count and the cost of its no-[CLS] score, in plain torch arithmetic.

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


def qwen_chunk_count(n: int, t: int) -> int:
    """The official port's ``num_patches = max(1, int(1024 / 576 * n / t))`` for ``n`` merged tokens and budget ``t``
    (16 for 576 -> 64)."""
    return max(1, int(((1024 / 576) * n) / t))


def received_attention_flops(cost) -> int:
    """Per image: the last tower block's ``q, k, v`` recomputed and its ``L x L`` scores over the ``L = m^2 N``
    patches (the received-attention score that replaces [CLS])."""
    patches, w = cost.n_visual * getattr(cost, "vision_merge", 2) ** 2, cost.vision_width
    return 2 * patches * w * 3 * w + 2 * patches * patches * w
