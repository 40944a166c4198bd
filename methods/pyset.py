"""CPython's ``list(set(ints))`` iteration order, replayed with tensor ops on the device (no host sync).

DART's official code visits its pivots in the order of a Python ``set`` of their sequence positions. The
set's order follows from CPython's hash table (``Objects/setobject.c``: ``set_add_entry``, linear probes,
then the perturbed jump; the table grows at 60% full), and an int hashes to itself, so the order depends
only on the keys and the insertion order. :func:`set_order` replays the insertions with tensors so that
an in-LLM prefill stays CUDA-graph capturable; :func:`pivot_order` is the plain Python the tests compare
it with.
"""

from __future__ import annotations

import torch

def pivot_order(image_pos: list[int], text_pos: list[int]) -> list[int]:
    """The official visiting order: ``list(set(image_pos + text_pos))`` (CPython set iteration)."""
    return list(set(image_pos + text_pos))


_LINEAR_PROBES, _PERTURB_SHIFT, _MINSIZE = 9, 5, 8


def _set_phases(n: int) -> list[tuple[int, int]]:
    """Table sizes of ``set(list_of_n_distinct_ints)``: ``[(mask, n_inserted_before_resize), ...]``.

    ``set_add_entry`` resizes when ``fill * 5 >= mask * 3`` to the smallest power of two above
    ``used * 4`` (``used * 2`` beyond 50000), re-inserting the old entries in table-slot order.
    """
    phases, mask, count = [], _MINSIZE - 1, 0
    for _ in range(n):
        count += 1
        if count * 5 >= mask * 3:
            phases.append((mask, count))
            minused = count * 2 if count > 50000 else count * 4
            size = _MINSIZE
            while size <= minused:
                size <<= 1
            mask = size - 1
    phases.append((mask, count))
    return phases


def _probe_sequence(x: int, mask: int, n_free: int) -> list[int]:
    """Slots ``set_add_entry`` visits for key ``x`` (hash ``x``) until ``n_free`` distinct slots were seen."""
    seq, seen, perturb, i = [], set(), x, x & mask
    while len(seen) < n_free:
        run = [i] + ([i + j for j in range(1, _LINEAR_PROBES + 1)] if i + _LINEAR_PROBES <= mask else [])
        seq.extend(run)
        seen.update(run)
        perturb >>= _PERTURB_SHIFT
        i = (i * 5 + 1 + perturb) & mask
    return seq


_RANK_TABLES: dict = {}


def _rank_table(mask: int, n: int, t: int, device) -> torch.Tensor:
    """``(t, mask + 1)`` float: where each slot first comes in key ``x``'s probe sequence (covering ``n``
    distinct slots), ``inf`` where it never comes; cached per process."""
    key = (mask, n, t, str(device))
    tab = _RANK_TABLES.get(key)
    if tab is None:
        tab = torch.full((t, mask + 1), float("inf"))
        for x in range(t):
            for r, slot in reversed(list(enumerate(_probe_sequence(x, mask, n)))):  # the first visit wins
                tab[x, slot] = r
        tab = _RANK_TABLES[key] = tab.to(device)
    return tab


def set_order(keys: torch.Tensor, t: int) -> torch.Tensor:
    """``list(set(keys[b].tolist()))`` for every row, on the device: ``(B, n)`` distinct ints in ``[0, t)``.

    CPython inserts each key at the first free slot of its probe sequence (which depends only on the
    key and the table size), grows the table as :func:`_set_phases` says, and iterates slots in order.
    This replays the insertions in two kernels per key: every key of a table phase gets its slots'
    probe ranks (:func:`_rank_table`) in one ``(B, n, S)`` tensor; a key takes the slot of least rank,
    and that slot's column is then set to ``inf`` for all keys (no host sync).
    """
    b, n = keys.shape
    order = keys
    phases = _set_phases(n)
    for ph, (mask, upto) in enumerate(phases):
        rank = _rank_table(mask, upto, t, keys.device)[order[:, :upto]]  # (B, upto, S)
        placed = []
        for r in range(upto):
            slot = rank[:, r].argmin(1, keepdim=True)  # (B, 1): at most ``upto - 1`` slots are taken
            placed.append(slot)
            if r + 1 < upto:
                rank.scatter_(2, slot.view(b, 1, 1).expand(-1, upto, -1), float("inf"))
        by_slot = torch.cat(placed, dim=1).argsort(dim=1)
        if ph + 1 < len(phases):  # resize: old entries re-inserted in slot order, then the remaining keys
            order = torch.cat([order[:, :upto].gather(1, by_slot), order[:, upto:]], dim=1)
    return order.gather(1, by_slot)
