"""Shared base of the in-LLM methods (FastV, PyramidDrop, SparseVLM, DART, TransPrune).

An in-LLM method prunes visual tokens at decoder-layer boundaries. It owns *what* to keep; the
adapter-side module :mod:`bench.models.llm_pruning` owns *where and how* (hooks, masks, positions,
KV cache). The contract between them:

* :meth:`InLLMMethod.plan` turns the method's hyperparameters, the budget mode and the model depth
  into a list of :class:`Stage` (pruning layer, visual tokens kept from that layer on, position-id
  policy). Layer indices in the configs are those of the 32-layer LLaVA-1.5-7B LLM; for a model with
  another depth they are scaled by ``L / ref_layers`` (rounded, clamped to ``[1, L-1]``); stages
  that collide on one layer run one after the other at that boundary. Set ``ref_layers`` to the
  model's depth to use the indices verbatim.
* :meth:`InLLMMethod.prune` gets a :class:`StageView` of the sequence entering the pruning layer and
  returns the kept indices into the current visual block (plus, for SparseVLM, merged tokens).

Budget modes (``docs/methods.md``, "The harness's conventions", 2), ``B = round(N * (1 - prune_ratio))``:

``official`` (the default)
    the method's own published setting for the budget ``B``, whatever LLM compute it costs: FastV keeps
    ``B`` after layer ``K``; PyramidDrop's ``λ`` schedule with ``λ = B / N`` (the first stage keeps ``B``);
    SparseVLM's published per-stage counts (merged tokens included, a layer mean of 206.5 at "192"); DART's
    ``4 + 8 floor(B / 8)`` after layer 2; TransPrune's published ratios, scaled to the budget's layer mean
    (its only published setting averages 236.25 tokens). Each method states what its budget counts
    (:attr:`InLLMMethod.official_measure`).
``layer_mean``
    the schedule is scaled so that the mean visual-token count over all LLM layers equals ``B``: the LLM
    compute of a pre-LLM method keeping ``B`` (equal-compute comparisons).
``after_prune``
    the count right after the first pruning layer equals ``B``.

A budget is *met* when the count it names (the layer mean, or the count after the first pruning stage)
is within one token of ``B``. Where the mode solves a schedule for ``B`` and no schedule reaches it (a
layer mean below what the first pruning layer allows), :meth:`InLLMMethod.check_budget` refuses the run
before any model work (exit code 2). Where the official schedule is a published table (SparseVLM, DART),
a miss is recorded (``budget_met: false`` with the measured count) and the row is placed under that count.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Protocol

import torch

from bench.errors import ConfigError, IncompatibleMethodError
from methods.base import PruningMethod

log = logging.getLogger(__name__)

Budget = Literal["official", "layer_mean", "after_prune"]
BUDGETS = ("official", "layer_mean", "after_prune")


@dataclass(frozen=True)
class Stage:
    """One pruning step.

    Attributes
    ----------
    layer : int
        Decoder layer (0-indexed) whose *input* is pruned: layers ``>= layer`` see ``n_keep`` visual tokens.
    n_keep : int
        Visual tokens (kept + merged) entering layers ``>= layer`` until the next stage.
    renumber : bool
        ``True``: position ids of the pruned sequence are contiguous (the visual block gets
        consecutive ids, later tokens shift down); ``False``: tokens keep their original ids.
    n_select : int
        Tokens *selected* (``n_keep`` minus merged tokens); equals ``n_keep`` for pure selections.
    """

    layer: int
    n_keep: int
    renumber: bool
    n_select: int = -1

    @property
    def n_selected(self) -> int:
        return self.n_keep if self.n_select < 0 else self.n_select


@dataclass
class StageOut:
    """A method's decision at one stage.

    Attributes
    ----------
    keep : torch.LongTensor
        ``(B, K)`` sorted indices into the current visual block (``0 <= keep < n_vis``).
    extra : torch.Tensor or None
        ``(B, M, D)`` merged tokens placed right after the kept ones (SparseVLM's recycling).
    """

    keep: torch.Tensor
    extra: torch.Tensor | None = None


class StageView(Protocol):
    """What the adapter exposes to a method at a pruning boundary (all tensors on the model device).

    Attributes
    ----------
    hidden : torch.Tensor
        ``(B, T, D)`` input of the pruning layer (output of the previous layer), left padded.
    valid : torch.BoolTensor
        ``(B, T)``, False on left padding.
    vis_start : torch.LongTensor
        ``(B,)`` first position of the visual block; the block is ``[vis_start, vis_start + n_vis)``.
    n_vis : int
        Visual tokens in the block (equal for every sample).
    layer : int
        The pruning layer.
    sample_seeds : torch.LongTensor
        ``(B,)`` per-sample seeds.
    state : dict
        Per-prefill scratch space shared by the stages of one forward (SparseVLM's raters,
        TransPrune's accumulated TTV); emptied at each prefill.
    static : dict
        What the method's optional ``runtime_setup(plan, prepared, device)`` returned, built once per
        context outside the forward (SparseVLM's seeded density jitter).
    uniform_start : bool
        Every sample's image starts at ``vis_start_min`` (host int): :meth:`visual` slices.
    """

    hidden: torch.Tensor
    valid: torch.Tensor
    vis_start: torch.Tensor
    n_vis: int
    layer: int
    sample_seeds: torch.Tensor

    def attn_rows(self, layer: int, queries: str, rope: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention probabilities of ``layer`` for some query rows, recomputed from its q/k and RoPE
        (``rope=False``: from the un-rotated q/k, ``layer == self.layer`` only; VScan's Qwen2.5-VL port).

        ``layer`` is either ``self.layer - 1`` (the layer that produced :attr:`hidden`, scored on its
        own input) or ``self.layer`` (scored on :attr:`hidden` through that layer's input norm).
        ``queries`` is ``"last"`` (the last token) or ``"after_image"`` (every token after the
        visual block). Returns ``(probs (B, H, Q, T), query_valid (B, Q))``.
        """

    def visual(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The current visual block of ``x`` along ``dim`` (1: ``(B, T, ...)`` tokens; -1: attention columns)."""

    def keys(self, layer: int) -> torch.Tensor:
        """Post-RoPE keys ``(B, H_kv, T, d)`` of ``layer`` (``self.layer - 1``) on the current sequence."""

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """The LLM's final RMSNorm applied to ``h``."""

    def input_embeds(self) -> torch.Tensor:
        """``(B, T0, D)`` the LLM's input embeddings (original, unpruned layout)."""

    def sublayer_io(self) -> Any:
        """Method-specific captured sublayer inputs/outputs (TransPrune)."""


def visual_block(x: torch.Tensor, start: torch.Tensor, n: int) -> torch.Tensor:
    """Gather ``x[b, start[b] : start[b] + n]`` for every sample: ``(B, T, ...) -> (B, n, ...)``.

    ``x`` may also be ``(B, H, Q, T)`` attention (the block is then taken on the last dim: use
    :func:`visual_columns`).
    """
    idx = start.view(-1, 1) + torch.arange(n, device=x.device).view(1, -1)
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def visual_columns(attn: torch.Tensor, start: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, ..., T) -> (B, ..., n)``: the visual-block columns of attention rows."""
    idx = start.view(-1, *([1] * (attn.dim() - 1))) + torch.arange(n, device=attn.device)
    return attn.gather(-1, idx.expand(*attn.shape[:-1], n))


def scale_layer(layer: int, n_layers: int, ref_layers: int) -> int:
    """Map a layer index of a ``ref_layers``-deep LLM onto an ``n_layers``-deep one (clamped to [1, L-1])."""
    if n_layers == ref_layers:
        return int(layer)
    return int(min(max(math.floor(layer * n_layers / ref_layers + 0.5), 1), n_layers - 1))


def layer_mean(stages: list[tuple[int, int]], n0: int, n_layers: int) -> float:
    """Mean visual tokens entering each of ``n_layers`` layers for ``[(layer, count), ...]`` stages."""
    counts = per_layer_counts(stages, n0, n_layers)
    return sum(counts) / n_layers


def per_layer_counts(stages: list[tuple[int, int]], n0: int, n_layers: int) -> list[int]:
    """Visual tokens entering each layer: ``n0`` before the first stage, then each stage's count."""
    out, cur, it = [], n0, sorted(stages, key=lambda s: s[0])
    j = 0
    for layer in range(n_layers):
        while j < len(it) and it[j][0] <= layer:
            cur = it[j][1]
            j += 1
        out.append(cur)
    return out


def solve_monotone(f: Callable[[float], float], target: float, lo: float, hi: float, iters: int = 60) -> float:
    """Bisection for ``f(x) = target`` with ``f`` non-decreasing on ``[lo, hi]`` (clamped at the ends)."""
    if f(lo) >= target:
        return lo
    if f(hi) <= target:
        return hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return hi


def solve_layer_mean(make: Callable[[float], list[int]], layers: list[int], n0: int, n_layers: int, target: float, hi: float) -> float:
    """The factor ``alpha`` in ``[0, hi]`` whose schedule ``zip(layers, make(alpha))`` (counts per stage, starting from
    ``n0`` tokens) has a layer mean of ``target`` over ``n_layers`` layers (:func:`solve_monotone`)."""
    return solve_monotone(lambda alpha: layer_mean(list(zip(layers, make(alpha))), n0, n_layers), target, 0.0, hi)


@dataclass
class InLLMMethod(PruningMethod):
    """Base of the in-LLM methods.

    Parameters
    ----------
    prune_ratio, seed
        As in :class:`~methods.base.PruningMethod`.
    budget : {"official", "layer_mean", "after_prune"}
        How ``prune_ratio`` maps onto the schedule (module docstring); ``official`` by default.
    ref_layers : int
        Depth of the LLM the configured layer indices refer to (32, LLaVA-1.5-7B).
    """

    budget: str = "official"
    ref_layers: int = 32

    stage: ClassVar[str] = "in_llm"
    #: layers whose q/k projections the adapter must capture, relative to each stage's layer
    #: (``-1``: the layer before the boundary, scored on its own input).
    capture_offsets: ClassVar[tuple[int, ...]] = ()
    #: ``True``: the method also selects before the LLM (VScan): the adapter runs its ``reduce`` on the
    #: projected tokens, as for a pre-LLM method, and its stages then start from the tokens kept there.
    pre_llm_selection: ClassVar[bool] = False
    #: what the official mode's budget counts: ``"after_prune"`` (tokens entering the first pruned layer)
    #: or ``"layer_mean"`` (the mean over the LLM's layers)
    official_measure: ClassVar[str] = "after_prune"
    #: the official schedule is a published table looked up by the budget (nothing is solved for it), so a
    #: count that misses ``B`` is recorded as such rather than refused
    official_is_table: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget not in BUDGETS:
            raise ConfigError(f"{self.name}: budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if int(self.ref_layers) < 1:
            raise ConfigError(f"{self.name}: ref_layers must be >= 1, got {self.ref_layers!r}")

    # -------------------------------------------------------------- schedule
    def target(self, n: int) -> int:
        """``round(N * (1 - prune_ratio))``: the budget in visual tokens."""
        return self.n_keep(n)

    def plan(self, n_vis: int, n_layers: int) -> list[Stage]:
        """The pruning schedule for ``n_vis`` visual tokens in an ``n_layers``-deep LLM (``[]``: no pruning)."""
        raise NotImplementedError

    def plan_for(self, n_grid: int, n_in: int, n_layers: int) -> list[Stage]:
        """The schedule when ``n_in`` of the tower's ``n_grid`` visual tokens enter the LLM (they differ only
        after a :attr:`pre_llm_selection`); default: :meth:`plan` of ``n_in``."""
        return self.plan(n_in, n_layers)

    def _warn_infeasible(self, achieved: float, target: float, n_layers: int) -> None:
        # the schedule is solved at every prefill: say it once per method and shape, not once per batch
        key = (n_layers, target, round(achieved, 3))
        warned = self.__dict__.setdefault("_infeasible_warned", set())
        if abs(achieved - target) > 1.0 and key not in warned:
            warned.add(key)
            log.warning(
                "%s: budget %s=%s cannot be reached with pruning layers %s of a %d-layer LLM; the schedule gives "
                "a layer mean of %.1f (recorded per layer)",
                self.name, self.budget, target, self.layers_for(n_layers), n_layers, achieved,
            )

    def layers_for(self, n_layers: int) -> list[int]:
        return []

    # -------------------------------------------------------------- budget bookkeeping
    @property
    def budget_mode(self) -> str:  # type: ignore[override]
        return self.budget

    @property
    def budget_measure(self) -> str:
        """The count this run's budget names: ``"after_prune"`` or ``"layer_mean"``."""
        return self.official_measure if self.budget == "official" else self.budget

    def measure(self, per_layer: list[float], n_vis: int, n_layers: int) -> float:
        """The budget's count read from visual tokens entering each layer (planned or measured)."""
        if self.budget_measure == "layer_mean":
            return sum(per_layer) / len(per_layer)
        plan = self.plan(n_vis, n_layers)
        return float(per_layer[min(s.layer for s in plan)] if plan else per_layer[0])

    def planned_counts(self, n_vis: int, n_layers: int) -> list[int]:
        """Visual tokens entering each layer under :meth:`plan`."""
        return per_layer_counts([(s.layer, s.n_keep) for s in self.plan(n_vis, n_layers)], n_vis, n_layers)

    def check_budget(self, n_vis: int, n_layers: int) -> None:
        """Refuse (:class:`IncompatibleMethodError`, exit code 2) a budget no schedule of this mode reaches.

        Called by the adapter before any model work. A published official table that misses ``B`` is not
        refused: the record says so (:meth:`budget_fields`).
        """
        if self.prune_ratio == 0.0 or (self.budget == "official" and self.official_is_table):
            return
        target = self.target(n_vis)
        got = self.measure(self.planned_counts(n_vis, n_layers), n_vis, n_layers)
        if abs(got - target) > 1.0:
            other = "layer_mean" if self.budget_measure != "layer_mean" else "after_prune"
            raise IncompatibleMethodError(
                f"{self.name}: budget={self.budget} cannot reach {target} visual tokens ({self.budget_measure.replace('_', ' ')}) "
                f"in a {n_layers}-layer LLM with pruning layers {self.layers_for(n_layers)}: the closest schedule gives {got:.2f}. "
                f"Choose another ratio, or budget={other}" + (" or official" if self.budget != "official" else "")
            )

    def budget_fields(self, n_vis: int, n_layers: int, kept: float | None, per_layer: list[float] | None) -> dict[str, Any]:
        """The record's budget keys from the measured per-layer counts (see :meth:`PruningMethod.budget_fields`)."""
        target = self.target(n_vis) if self.prune_ratio > 0 else n_vis
        got = None if not per_layer else round(self.measure(list(per_layer), n_vis, n_layers), 3)
        return {"budget_mode": self.budget, "budget_tokens": target, "budget_measure": self.budget_measure,
                "budget_measured": got, "budget_met": None if got is None else abs(got - target) <= 1.0}

    # -------------------------------------------------------------- selection
    def prune(self, i: int, stage: Stage, view: StageView) -> StageOut:
        """Decide stage ``i``: return the kept indices into the current visual block."""
        raise NotImplementedError
