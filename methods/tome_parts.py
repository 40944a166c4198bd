"""ToMe's per-block merge counts that land on the harness's budget (:meth:`methods.tome.ToMe.schedule`).

ToMe itself merges a constant ``r`` per block; a budget of ``round(N (1 - prune_ratio))`` tokens needs the
schedule below (576 -> 192 is ``[17] * 16 + [16] * 7`` over LLaVA's 23 blocks).
"""

from __future__ import annotations

from bench.errors import ConfigError


def tome_schedule(n_tokens: int, n_keep: int, n_blocks: int, class_token: bool) -> list[int]:
    """Per-block ``r`` merging ``n_tokens`` patches down to ``n_keep`` over ``n_blocks``.

    ToMe merges at most half of the unprotected tokens in a block (its bipartite split). The merges are
    spread evenly (``ceil(left / blocks left)`` per block, close to ToMe's usual constant ``r``). When
    the halving cap makes the even split fall short (few blocks, small budgets: e.g. 576 -> 58 in the
    5 feature blocks of the embedded tower), the schedule is front-loaded instead: the smallest
    constant ``r`` that, capped at half per block, merges enough, with the last blocks trimmed to land
    on ``n_keep``. Raises when even merging half in every block cannot reach the budget.
    """
    protected = 1 if class_token else 0

    def even() -> list[int] | None:
        left, t, out = n_tokens - n_keep, n_tokens + protected, []
        for i in range(n_blocks):
            r = min(-(-left // (n_blocks - i)), (t - protected) // 2)
            out.append(r)
            left, t = left - r, t - r
        return None if left else out

    def capped(rc: int) -> list[int]:
        t, out = n_tokens + protected, []
        for _ in range(n_blocks):
            out.append(min(rc, (t - protected) // 2))
            t -= out[-1]
        return out

    out = even()
    if out is not None:
        return out
    need = n_tokens - n_keep
    if sum(capped(n_tokens)) < need:
        raise ConfigError(f"tome: cannot merge {n_tokens} tokens down to {n_keep} in {n_blocks} blocks (at most half per block)")
    lo, hi = 1, n_tokens  # smallest constant r whose capped schedule merges at least `need`
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if sum(capped(mid)) >= need else (mid + 1, hi)
    out = capped(lo)
    extra = sum(out) - need
    for i in reversed(range(n_blocks)):  # trim from the back: earlier caps, hence feasibility, are unchanged
        cut = min(extra, out[i])
        out[i] -= cut
        extra -= cut
    return out


def per_block_r(r: int | list[int] | None, n_tokens: int, n_keep: int, n_blocks: int,
                class_token: bool) -> list[int]:
    """:meth:`methods.tome.ToMe.schedule`: the configured ``r`` (an int for every block, or one per block), or,
    when ``None``, :func:`tome_schedule` landing on ``n_keep``."""
    if r is None:
        return tome_schedule(n_tokens, n_keep, n_blocks, class_token)
    if isinstance(r, int):
        return [int(r)] * n_blocks
    rs = [int(v) for v in r]
    if len(rs) != n_blocks:
        raise ConfigError(f"tome: r has {len(rs)} entries for {n_blocks} blocks")
    return rs
