"""DART's plumbing: the prompt-layout tensors built once per context, the keys' L1 norms in one copy, and the
per-pivot counts of a budget.

The rule that uses them is :func:`methods.dart.dart_select`.
"""

from __future__ import annotations

import torch


def dart_layout(valid: torch.Tensor, vis_start: torch.Tensor, n_vis: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tensors of :func:`dart_select` that depend on the layout only (built once per context).

    Returns ``text_bias`` ``(B, T)`` fp32 (0 on the text tokens after the image, ``-inf`` elsewhere),
    ``pad`` ``(B, 1)`` (left padding) and ``img_offset`` ``(B, 1)`` (``vis_start - pad``: a visual index
    to its position in the unpadded sample).
    """
    t = valid.shape[1]
    is_text = (torch.arange(t, device=valid.device).view(1, t) >= (vis_start + n_vis).view(-1, 1)) & valid
    text_bias = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device).masked_fill(~is_text, float("-inf"))
    pad = (~valid).sum(1, keepdim=True)
    return text_bias, pad, vis_start.view(-1, 1) - pad


def pivot_counts(n_keep: int, n_pivots: int, n_image_pivots: int) -> list[int]:
    """Per-pivot counts so that ``n_image_pivots + sum == n_keep`` (remainder to the first visited)."""
    rest = max(n_keep - n_image_pivots, 0)
    base, extra = divmod(rest, n_pivots)
    return [base + (1 if j < extra else 0) for j in range(n_pivots)]


def prompt_layout(prepared, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`dart_layout` of a prepared batch (its ``image_spans`` and attention mask), on ``device``."""
    spans = prepared.extras["image_spans"].to(device)
    valid = prepared.attention_mask.to(device).bool()
    return dart_layout(valid, spans[:, 0], int(spans[0, 1] - spans[0, 0]))


def stage_layout(view) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layout :meth:`methods.dart.DART.runtime_setup` built for this view's batch, or built now."""
    layout = view.static.get("layout") if isinstance(getattr(view, "static", None), dict) else None
    if layout is None or layout[0].shape != view.valid.shape:
        layout = dart_layout(view.valid, view.vis_start, view.n_vis)
    return layout


def key_l1_norms(keys: torch.Tensor) -> torch.Tensor:
    """``(B, T, H*d)`` or ``(B, T, H, d)`` keys -> ``(B, T)`` fp32 L1 norms of the concatenated heads."""
    b, t = keys.shape[:2]
    if keys.dim() == 4 and keys.dtype != torch.float32:
        # one strided copy for the heads' concatenation and the cast (exact) instead of a copy then a cast
        k32 = torch.empty(keys.shape, dtype=torch.float32, device=keys.device)
        k32.copy_(keys)
        return k32.view(b, t, -1).abs_().sum(-1)
    return keys.reshape(b, t, -1).float().abs().sum(-1)
