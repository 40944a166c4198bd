"""FlowCut's Qwen port, the rule in plain torch (``TungChintao/FlowCut``, folder ``FlowCut_Qwen/``:
``modeling_qwen2_vl_flowcut.py`` + ``utils_flowcut.py``; its README: "implementation details of FlowCut for Qwen2-VL,
which are also applicable to Qwen2.5-VL").

What the official port does for ``flowcut(model, target_num)`` (batch 1, one image):

* **in the tower** (``Qwen2VisionTransformerPretrainedModel_forward``): the tower keeps ``target = 8 target_num``
  patches (``visual.target_num = 2 target_num``, ``target = visual.target_num * 4``), i.e. ``2 target_num`` merged
  tokens. After every block, while more than ``target`` patches remain, the block's attention gives
  ``relation = mean_heads softmax(mean_tokens(q) . k^T / sqrt(d))`` (q, k rotated; one *global* query, the mean of
  the block's queries over all current patches; fp32 softmax cast back) and ``score = relation * |mean_heads v|_1``
  (``compute_score_vit``), accumulated as ``c = 0.5 c + 0.5 score`` (the first scored block sets ``c``). With
  ``rpl = blocks - i - 1`` remaining blocks, blocks with an even ``rpl`` cut
  ``int(round((N' - target) / sqrt(rpl) * (1 - (H / log N')^2)))`` patches (``adaptive_prune_ratio``:
  ``H = -sum a log(a + 1e-7)``), never below ``target``; the last block (``rpl = 0``) cuts to ``target``. The kept
  patches are ``topk(c)`` re-sorted (tower order survives), with their rotary rows. The merger then merges each run
  of 4 consecutive surviving patches (they need not be one 2x2 group);
* **in the LLM** (``Qwen2VLModel_forward`` / ``Qwen2VLSdpaAttention_forward``): inside layer 1 (the second), when the
  image holds more than ``target_num`` tokens, the last prompt token's rotated query against the image's rotated
  keys, ``relation = mean_heads softmax(q k^T / sqrt(d))`` over the image columns only, and its value against the
  image's values, ``semantic = mean_heads softmax(v_last v^T / sqrt(d))``; ``score = (relation + semantic) *
  |mean_heads v|_1`` (``compute_score_llm``: the normalised copies it computes are unused); ``topk(target_num)``
  sorted. Layer 1's output keeps those image tokens (layers 0 and 1 ran on all of them, their KV cache keeps all),
  at their positions; layers 2+ see ``target_num``.
* **positions**: after a cut in the tower the ``2 target_num`` merged tokens take the *first* ``2 target_num``
  M-RoPE positions of the image block (``position_ids[:, :, first:first + image_embeds.shape[0]]``); the text after
  the image keeps its original positions.
"""

from __future__ import annotations

import math

import torch


def qwen_tower_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One tower block's FlowCut quantities (official ``VisionSdpaAttention_forward`` + ``compute_score_vit``).

    Parameters
    ----------
    q, k : torch.Tensor
        ``(H, L, d)`` the block's rotated queries and keys on its normed input (all current patches of one image).
    v : torch.Tensor
        ``(H, L, d)`` its values.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``(1, L)`` relation attention of the global query (head mean, ``q``'s dtype) and ``(1, L)`` scores.
    """
    gq = q.mean(1, keepdim=True)  # (H, 1, d)
    w = torch.bmm(gq, k.transpose(1, 2)) / math.sqrt(q.shape[-1])
    attn = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype).mean(0)
    return attn, attn * torch.norm(v.mean(0), p=1, dim=-1)


def qwen_prune_count(attn: torch.Tensor, rpl: int, target: int) -> int:
    """Official ``adaptive_prune_ratio``: patches to cut at a block ``rpl`` blocks before the last, ``(1, L)`` attention.

    Clamped at 0: near-uniform attention can put the entropy ratio above 1, where the official negative count would
    ask ``topk`` for more patches than exist and stop with an error (named port difference).
    """
    n = attn.shape[-1]
    entropy = -torch.sum(attn * torch.log(attn + 1e-7), dim=-1)
    ratio = entropy / torch.log(torch.tensor(n))
    r = (n - target) / rpl**0.5 * (1 - ratio**2)
    return max(int(r.round()), 0)


def qwen_tower_step(i: int, n_blocks: int, attn: torch.Tensor, score: torch.Tensor, target: int, state: dict) -> torch.Tensor | None:
    """After tower block ``i`` of ``n_blocks``: the sorted indices of the patches kept (into the current ones), or ``None``.

    ``attn``/``score`` ``(1, L)`` from :func:`qwen_tower_scores`; ``target`` patches are the tower's floor; ``state``
    carries the accumulated scores (``"cum"``) between blocks of one image.
    """
    n = attn.shape[-1]
    if n <= target:
        return None
    cum = state.get("cum")
    cum = score[0] if cum is None else 0.5 * cum + 0.5 * score[0]
    state["cum"] = cum
    rpl = n_blocks - i - 1
    if rpl % 2:
        return None
    cut = qwen_prune_count(attn, rpl, target) if rpl else n
    keep = torch.topk(cum, max(n - cut, target), dim=0).indices.sort(dim=0).values
    state["cum"] = cum[keep]
    return keep


def qwen_llm_scores(q_last: torch.Tensor, k_vis: torch.Tensor, v_last: torch.Tensor, v_vis: torch.Tensor) -> torch.Tensor:
    """The LLM stage's scores (official attention forward of layer 1 + ``compute_score_llm``), batched.

    Parameters
    ----------
    q_last : torch.Tensor
        ``(B, H, 1, d)`` the last prompt token's rotated query.
    k_vis : torch.Tensor
        ``(B, H, n, d)`` the image tokens' rotated keys (key heads repeated to the query heads).
    v_last, v_vis : torch.Tensor
        ``(B, H, 1, d)`` and ``(B, H, n, d)`` values (repeated likewise).

    Returns
    -------
    torch.Tensor
        ``(B, n)`` scores; the stage keeps their ``topk``, sorted.
    """
    d = q_last.shape[-1]
    rel = torch.softmax(q_last @ k_vis.transpose(-1, -2) / math.sqrt(d), dim=-1, dtype=torch.float32).to(q_last.dtype).mean(1)
    sem = torch.softmax(v_last @ v_vis.transpose(-1, -2) / math.sqrt(d), dim=-1, dtype=torch.float32).to(q_last.dtype).mean(1)
    return ((rel + sem) * torch.norm(v_vis.mean(1), p=1, dim=-1).unsqueeze(1))[:, 0]
