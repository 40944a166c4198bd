"""The contract between pruning methods and model adapters.

Methods decide *what to keep*; model adapters (``bench/models``) decide *where and how to prune*.
A method never touches the model: everything it needs (the patch grid, CLS attention, keys of a
vision layer, ...) reaches it through a :class:`VisionContext` built by the adapter.

Conventions (``shared/docs/methods.md``, "The harness's conventions"):

* ``prune_ratio`` is the fraction of visual tokens *removed*, in ``[0, 1)``; a pre-LLM method keeps
  exactly ``round(N * (1 - prune_ratio))`` of the ``N`` visual tokens.
* ``prune_ratio == 0`` reproduces the unpruned model exactly.
* Selection is deterministic; randomness is seeded per sample so that a sample's kept tokens do not
  depend on its batch neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

import torch

from bench.errors import ConfigError, IncompatibleMethodError

Stage = Literal["none", "pre_llm", "in_vision", "in_llm"]


@dataclass
class VisionContext:
    """What an adapter tells a method about one batch of images.

    Attributes
    ----------
    grid : tuple[int, int]
        ``(H, W)`` of the patch grid; ``H * W == N`` visual tokens per image, raster order.
    has_cls : bool
        Whether the vision tower has a CLS token (methods scoring by CLS attention need one).
    sample_seeds : torch.LongTensor
        ``(B,)`` per-sample seeds derived from the run seed and the sample's identity, for methods
        that are random by design.
    extras : dict[str, Callable[[], torch.Tensor]]
        Lazily computed model quantities a method may ask for (e.g. ``"cls_attn"``); only what the
        method declares in :attr:`PruningMethod.needs` is computed.
    """

    grid: tuple[int, int]
    has_cls: bool
    sample_seeds: torch.Tensor
    extras: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)

    @property
    def n_visual(self) -> int:
        return self.grid[0] * self.grid[1]

    def get(self, key: str) -> torch.Tensor:
        if key not in self.extras:
            raise IncompatibleMethodError(f"the model adapter does not provide {key!r}")
        return self.extras[key]()


@dataclass
class VisualSelection:
    """A method's output for one batch.

    Attributes
    ----------
    features : torch.Tensor
        ``(B, K, D)`` visual features handed to the LLM (selected or merged), in the order the LLM
        will see them.
    kept_index : torch.LongTensor or None
        ``(B, K)`` indices into the ``N`` input tokens when the output is a pure selection; ``None``
        for merging methods (pooling, clustering).
    n_kept : torch.LongTensor
        ``(B,)`` number of valid rows per sample (``K`` for every sample unless the method is
        adaptive, in which case rows past ``n_kept[b]`` are padding and are dropped by the adapter).
    """

    features: torch.Tensor
    kept_index: torch.Tensor | None
    n_kept: torch.Tensor


@dataclass
class PruningMethod:
    """Base class of every pruning method.

    Subclasses set :attr:`stage` and implement :meth:`select` (pure selections) or override
    :meth:`reduce` (merging methods). Score-based methods may implement only :meth:`score`.

    Parameters
    ----------
    prune_ratio : float
        Fraction of visual tokens removed, in ``[0, 1)``.
    seed : int
        Run seed; only methods that are random by design use it (through ``ctx.sample_seeds``).
    """

    prune_ratio: float = 0.0
    seed: int = 0

    #: Where the method acts: before the LLM on projected features, inside the vision tower, or
    #: inside the LLM's decoder layers. The adapter refuses stages it does not implement.
    stage: ClassVar[Stage] = "pre_llm"
    #: Model quantities the method needs from the adapter (keys of ``VisionContext.extras``).
    needs: ClassVar[frozenset[str]] = frozenset()
    #: Whether the method needs a CLS token in the vision tower.
    requires_cls: ClassVar[bool] = False

    def __post_init__(self) -> None:
        try:
            ratio = float(self.prune_ratio)
        except (TypeError, ValueError):
            raise ConfigError(f"ratio must be a number in [0, 1), got {self.prune_ratio!r}") from None
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(f"ratio must be in [0, 1) (the fraction of visual tokens removed), got {ratio}")
        self.prune_ratio = ratio

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def n_keep(self, n: int) -> int:
        """Tokens kept out of ``n``: ``round(n * (1 - prune_ratio))``, at least 1."""
        if self.prune_ratio == 0.0:
            return n
        return max(1, int(round(n * (1.0 - self.prune_ratio))))

    def check_compatible(self, ctx: VisionContext) -> None:
        """Raise :class:`IncompatibleMethodError` when the method cannot run on this geometry."""
        if self.requires_cls and not ctx.has_cls:
            raise IncompatibleMethodError(f"method {self.name!r} scores by CLS attention, but this vision tower has no CLS token")

    def score(self, vis: torch.Tensor, ctx: VisionContext) -> torch.Tensor:
        """Per-token importance, ``(B, N)``; higher is kept first. Score-based methods override this."""
        raise NotImplementedError(f"{type(self).__name__} implements neither score() nor select()")

    def select(self, vis: torch.Tensor, ctx: VisionContext) -> torch.Tensor:
        """Indices of the kept tokens.

        Parameters
        ----------
        vis : torch.Tensor
            ``(B, N, D)`` projected visual features, raster order.
        ctx : VisionContext

        Returns
        -------
        torch.LongTensor
            ``(B, K)`` sorted indices, ``K = n_keep(N)``. The default keeps the top-``K`` of
            :meth:`score` (ties follow ``torch.topk``), re-sorted into raster order.
        """
        k = self.n_keep(vis.shape[1])
        idx = self.score(vis, ctx).topk(k, dim=1).indices
        return idx.sort(dim=1).values

    def reduce(self, vis: torch.Tensor, ctx: VisionContext) -> VisualSelection:
        """Map ``(B, N, D)`` features to what the LLM sees. Default: gather :meth:`select`'s indices."""
        b, n, _ = vis.shape
        if self.prune_ratio == 0.0:
            idx = torch.arange(n, device=vis.device).expand(b, n)
            return VisualSelection(vis, idx, torch.full((b,), n, dtype=torch.long))
        idx = self.select(vis, ctx)
        feats = vis.gather(1, idx.unsqueeze(-1).expand(-1, -1, vis.shape[-1]))
        return VisualSelection(feats, idx, torch.full((b,), idx.shape[1], dtype=torch.long))

    def describe(self) -> dict[str, Any]:
        """Settings that identify this method's behaviour (go into records and lmms-eval ``model_args``)."""
        from dataclasses import asdict

        return {"method": self.name, **asdict(self)}
