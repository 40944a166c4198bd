"""VisPruner's round sizes and the hand-over between its CUDA fast path and the torch rounds.

The rounds' count and sizes depend on lengths only (:func:`dedup_rounds`); :func:`handover_length` says from which
residual length the rounds run in torch (:func:`methods.vispruner.vispruner_select`, :mod:`kernels.vispruner`).
"""

from __future__ import annotations


def dedup_rounds(n_res: int, n_div: int, step: int) -> list[int]:
    """Tokens dropped per de-duplication round, from ``n_res`` residual tokens down to ``n_div``.

    A round asks for ``r = min(step, L - n_div)`` and can drop at most the ``ceil(L / 2)`` even-position
    tokens; the count of rounds and their sizes depend on lengths only, never on values.
    """
    out, length = [], n_res
    while n_div > 0:
        r = min(step, length - n_div)
        if r <= 0:
            break
        out.append(r)
        length -= min(r, (length + 1) // 2)
    return out


#: torch's CUDA sort ranks rows of up to this many entries with a bitonic network (not stable)
CUDA_BITONIC_MAX = 32


def handover_length(n_res: int, n_div: int, step: int) -> int:
    """The residual-list length from which the rounds run in torch rather than in the CUDA kernel: the first
    length of the rounds' sequence whose round sorts ``CUDA_BITONIC_MAX`` or fewer maxima (``ceil(L / 2)``
    evens), or ``n_div`` when none does."""
    length = n_res
    for r in dedup_rounds(n_res, n_div, step):
        if (length + 1) // 2 <= CUDA_BITONIC_MAX:
            return length
        length -= min(r, (length + 1) // 2)
    return length if n_div > 0 else 0
