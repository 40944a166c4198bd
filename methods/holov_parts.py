"""HoloV's chunk geometry (:func:`methods.holov.holov_select`): ragged chunks of consecutive raster tokens as one
padded ``(C, M)`` layout, and the per-chunk mean over its valid slots."""

from __future__ import annotations

import torch


def chunk_layout(n: int, chunks: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, M)`` token index of each chunk slot (``M = ceil(N / C)``; the first ``N % C`` chunks hold one
    more) and its validity mask; invalid slots point at token 0."""
    base, rem = divmod(n, chunks)
    c = torch.arange(chunks, device=device)
    sizes = base + (c < rem).long()  # device arithmetic only: no host-to-device copy inside a graph capture
    starts = c * base + c.clamp(max=rem)
    m = base + (rem > 0)
    r = torch.arange(m, device=device)
    valid = r.unsqueeze(0) < sizes.unsqueeze(1)
    return torch.where(valid, starts.unsqueeze(1) + r, 0), valid


def chunk_mean(t: torch.Tensor, valid: torch.Tensor, even: bool) -> torch.Tensor:
    """``(B, C, M) -> (B, C)`` mean over each chunk's valid slots (``mean`` itself when every chunk is
    full, as the official per-chunk ``mean``)."""
    if even:
        return t.mean(dim=-1)
    return (t * valid.to(t.dtype)).sum(dim=-1) / valid.sum(dim=-1).to(t.dtype)
