"""VisionZip on Qwen2.5-VL: received attention instead of [CLS], merging on the merged (2x2) tokens.

VisionZip's maintainers speak of an official Qwen2.5-VL implementation (``JIA-Lab-research/VisionZip``, issues
#24 and #25), but that repository's Qwen code cannot be read here (no snapshot holds it). This port follows the
one public implementation that could be read, ModelTC/LightCompress (``llmc/compression/token_reduction/
visionzip.py``, Qwen2.5-VL support merged in PR #423): the same no-[CLS] substitute the VisionZip and VisPruner
authors describe (attention each token *receives*, VisPruner issue #1: "adopted in VisionZip"). The record names
it (:attr:`VisionZipQwenPort.deviations`, recorded for :class:`methods.visionzip.VisionZip`), since it is not checked against the JIA-Lab code.

The rule, per image of ``N`` merged tokens (raster order):

* *Scores*: the tower's last block (a full-attention block) softmax, mean over heads, summed over all query
  patches (the attention each patch receives), averaged over the 2x2 patches of each merged token
  (``VisionContext`` key ``merged_attn_received_sum:raster``, ``(B, N)``, given by the adapter).
* *Dominant*: the top ``D`` by score (``torch.topk``).
* *Contextual*: the ``R = N - D`` others, in raster order, compared by the last block's rotated keys averaged
  over heads and over each 2x2 group (``merged_keys:raster``, ``(B, N, d_head)``), L2-normalised. Targets are every
  ``max(1, R // C)``-th of them, the first ``C``; every other token joins the target of highest cosine (first
  index on ties) and a contextual token is ``x_target + mean(x_assigned)`` on the LLM-space features.
* *Output*: the ``D + C`` rows in raster order of their positions, a contextual token at its target's position
  (LightCompress writes it into the target's row of the prompt and drops the other rows), so every row keeps
  an original 3-D M-RoPE position.

Budget: ``T = round(N * (1 - ratio))`` split as on LLaVA (``C = round(T * contextual_share)``), where
LightCompress takes ``D`` and ``C`` as fractions of ``N`` (``int(d * N)``, ``max(int(c * N), 1)``).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from methods.holov_ports import received_attention_flops

SCORE_KEY = "merged_attn_received_sum:raster"
KEYS_KEY = "merged_keys:raster"


class VisionZipQwenPort:
    """The port's compatibility and recorded deviation, mixed into :class:`methods.visionzip.VisionZip`."""

    deviations: ClassVar[tuple[str, ...]] = (
        ("qwen_port (Qwen2.5-VL runs only): the official JIA-Lab-research/VisionZip Qwen2.5-VL code could not be read; the "
         "port follows ModelTC/LightCompress (received attention of the last tower block, merging on the merged tokens), "
         "with the LLaVA budget split (C = round(T * 30/192)) instead of its fractions of N (methods.visionzip_ports)"),
    )

    def check_compatible(self, ctx) -> None:
        """Without [CLS], the Qwen2.5-VL port runs where the adapter serves its received attention and keys."""
        if not ctx.has_cls and SCORE_KEY in ctx.extras and KEYS_KEY in ctx.extras:
            return
        super().check_compatible(ctx)


def contextual_merge(metric: torch.Tensor, hidden: torch.Tensor, contextual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's contextual tokens from the ``R`` remaining tokens.

    Parameters
    ----------
    metric : torch.Tensor
        ``(B, R, d)`` the remaining tokens' keys (not yet normalised), in raster order.
    hidden : torch.Tensor
        ``(B, R, C)`` their features.
    contextual : int
        ``C >= 1``.

    Returns
    -------
    tokens : torch.Tensor
        ``(B, n_t, C)`` ``hidden[target] + mean(hidden[assigned])`` (``n_t = min(C, ceil(R / step))``).
    targets : torch.LongTensor
        ``(n_t,)`` the targets' indices among the ``R``.
    """
    b, r, c = hidden.shape
    dev = hidden.device
    metric = metric / metric.norm(dim=-1, keepdim=True)
    step = max(1, r // contextual)
    n_t = len(range(0, r, step)[:contextual])
    tgt = torch.arange(n_t, device=dev) * step
    # the non-targets in order, in closed form: the first n_t blocks of `step` lose their first, the tail is whole
    i = torch.arange(r - n_t, device=dev)
    oth = i + n_t if step == 1 else torch.where(i < n_t * (step - 1), i // (step - 1) * step + i % (step - 1) + 1, i + n_t)
    sim = torch.bmm(metric[:, oth], metric[:, tgt].transpose(1, 2))  # (B, R - n_t, n_t)
    one_hot = torch.zeros(b, n_t, r - n_t, dtype=hidden.dtype, device=dev).scatter_(1, sim.argmax(dim=2).unsqueeze(1), 1.0)
    rest = hidden[:, oth]
    # the official one-hot matmul, deterministic on CUDA (a float scatter_add there is an atomic add whose order
    # changes from run to run); one GEMM per sample, because a batched GEMM may pick another kernel, and so another
    # summation order, for another batch size: a sample's tokens must not depend on its batch neighbours
    agg = torch.stack([one_hot[j] @ rest[j] for j in range(b)])
    agg = agg / one_hot.sum(dim=2).clamp(min=1).unsqueeze(-1)
    return hidden[:, tgt] + agg, tgt


def visionzip_received(scores: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor, dominant: int,
                       contextual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip without a [CLS] token (the Qwen2.5-VL port above).

    Parameters
    ----------
    scores : torch.Tensor
        ``(B, N)`` received attention per merged token.
    keys : torch.Tensor
        ``(B, N, d)`` merged, head-averaged keys.
    hidden : torch.Tensor
        ``(B, N, C)`` the merged tokens (LLM space).
    dominant, contextual : int
        ``D >= 1`` and ``C >= 0``, ``D + C <= N``.

    Returns
    -------
    features : torch.Tensor
        ``(B, D + n_t, C)`` in raster order of their positions.
    positions : torch.LongTensor
        ``(B, D + n_t)`` each row's token index (a contextual token: its target's).
    """
    b, n, c = hidden.shape
    top = scores.topk(dominant, dim=1).indices
    keep = torch.zeros(b, n, dtype=torch.bool, device=hidden.device).scatter_(1, top, True)
    out = hidden.clone()
    if contextual > 0 and n > dominant:
        rem = (~keep).to(torch.int8).sort(dim=1, stable=True, descending=True).indices[:, : n - dominant]
        gather = rem.unsqueeze(-1)
        tokens, tgt = contextual_merge(keys.gather(1, gather.expand(-1, -1, keys.shape[-1])),
                                       hidden.gather(1, gather.expand(-1, -1, c)), contextual)
        at = rem[:, tgt]
        out.scatter_(1, at.unsqueeze(-1).expand(-1, -1, c), tokens)
        keep.scatter_(1, at, True)
    positions = keep.to(torch.int8).sort(dim=1, stable=True, descending=True).indices[:, : int(keep[0].sum())]
    return out.gather(1, positions.unsqueeze(-1).expand(-1, -1, c)), positions


def visionzip_received_flops(cost, dominant: int, contextual: int) -> int:
    """Per image: the received-attention pass (:func:`methods.holov_ports.received_attention_flops`, which also
    yields the keys), the key cosines of the non-targets to the targets and their one-hot sums on LLM features."""
    total = received_attention_flops(cost)
    r = cost.n_visual - dominant
    if contextual > 0 and r > 0:
        step = max(1, r // contextual)
        n_t = min(contextual, -(-r // step))
        total += 2 * (r - n_t) * n_t * cost.vision_head_dim + 2 * n_t * (r - n_t) * cost.llm_width
    return total
