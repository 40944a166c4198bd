"""CDPruner's plumbing (:mod:`methods.cdpruner`): the relevance mean over each question's own chunks, the
official index mask as kept indices, and the ``theta`` option's check."""

from __future__ import annotations

import torch

from bench.errors import ConfigError


def chunk_mean(neg_rel: torch.Tensor, n_chunks: torch.Tensor) -> torch.Tensor:
    """``(B, N, M)`` per-chunk relevances -> ``(B, N)`` mean over each sample's first ``n_chunks[b]`` chunks (the
    official ``mean`` over one question's chunks; a batch may hold questions of different chunk counts)."""
    m = neg_rel.shape[-1]
    n_chunks = n_chunks.to(neg_rel.device)
    if m == 1 or bool((n_chunks == m).all()):
        return neg_rel.mean(dim=-1)
    valid = torch.arange(m, device=neg_rel.device) < n_chunks.unsqueeze(1)
    return neg_rel.masked_fill(~valid.unsqueeze(1), 0.0).sum(dim=-1) / n_chunks.unsqueeze(1).to(neg_rel.dtype)


def picks_to_kept(picks: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official index mask of ``(B, T)`` picks as ``(B, T)`` ascending kept indices and ``(B,)`` counts.

    Repeated picks (a degenerate kernel) count once, as the mask does; rows past ``n_kept[b]`` hold the
    smallest dropped indices (padding the adapter discards).
    """
    b, t = picks.shape
    mask = torch.zeros(b, n, dtype=torch.bool, device=picks.device)
    mask.scatter_(1, picks, True)
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices  # kept first, each part ascending
    return order[:, :t], mask.sum(dim=1)


def theta_option(theta) -> float | None:
    """``theta`` as a float in ``[0, 1)``, or ``None`` (off, official); anything else is a :class:`ConfigError`."""
    if theta is None:
        return None
    try:
        theta = float(theta)
    except (TypeError, ValueError):
        raise ConfigError(f"cdpruner: theta must be null or a number in [0, 1), got {theta!r}") from None
    if not 0.0 <= theta < 1.0:
        raise ConfigError(f"cdpruner: theta must be null or in [0, 1), got {theta}")
    return theta
