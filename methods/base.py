"""The contract between pruning methods and model adapters.

Methods decide *what to keep*; model adapters (``bench/models``) decide *where and how to prune*.
A method never touches the model: everything it needs (the patch grid, CLS attention, keys of a
vision layer, ...) reaches it through a :class:`VisionContext` built by the adapter.

Conventions (``docs/methods.md``, "The harness's conventions"):

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
    extras : dict
        What the adapter records beside the features (``"vision_tokens_per_layer"``: per sample, the
        visual tokens entering each vision block when a method cuts inside the tower).
    """

    features: torch.Tensor
    kept_index: torch.Tensor | None
    n_kept: torch.Tensor
    extras: dict = field(default_factory=dict)


def keep_all(vis: torch.Tensor) -> VisualSelection:
    """``(B, N, D)`` features passed through unchanged: every token kept, in raster order (``prune_ratio == 0``)."""
    b, n, _ = vis.shape
    return VisualSelection(vis, torch.arange(n, device=vis.device).expand(b, n), torch.full((b,), n, dtype=torch.long))


def gather_selection(vis: torch.Tensor, idx: torch.Tensor) -> VisualSelection:
    """The default :meth:`PruningMethod.reduce` on given picks: ``(B, N, D)`` features, ``(B, K)`` indices."""
    feats = vis.gather(1, idx.unsqueeze(-1).expand(-1, -1, vis.shape[-1]))
    return VisualSelection(feats, idx, torch.full((vis.shape[0],), idx.shape[1], dtype=torch.long))


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
    #: Whether the method reads ``ctx.grid`` as a 2-D raster (pooling, spatial neighbours); adapters whose
    #: budget unit is no single grid (LLaVA-NeXT's per-image budget) refuse it.
    needs_grid: ClassVar[bool] = False
    #: Whether :meth:`reduce` outputs merged tokens (``kept_index`` ``None`` when pruning): they have no
    #: original position, so adapters that keep original positions (Qwen2.5-VL's M-RoPE) refuse the method.
    merges: ClassVar[bool] = False
    #: Whether :meth:`reduce` (with the extras it asks for) is CUDA-graph capturable: no host sync,
    #: output shapes independent of values, deterministic, ``ctx.sample_seeds`` unused (a graph would
    #: freeze it). Adapters may then replay it through :class:`CudaGraphCache`.
    graph_safe: ClassVar[bool] = False
    #: Whether :meth:`select` reads only the shape of ``vis`` (its picks come from the extras alone). With
    #: the default :meth:`reduce`, a CUDA-graph replay then captures the selection without the projected
    #: features (no copy of them into the graph) and gathers them after the replay.
    select_reads_shape_only: ClassVar[bool] = False
    #: Deliberate departures from the official code that every run of the method makes (not options: the
    #: official behaviour is a defect, e.g. one sample's choice applied to a whole batch). Each entry is
    #: ``"name: what the official code does; what this harness does"``; runs record them (``method_deviations``).
    deviations: ClassVar[tuple[str, ...]] = ()
    #: The allowed values of the method's string options, ``{field: choices}``, checked on construction
    #: (a value outside them is a :class:`ConfigError`, exit code 2).
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: The method's integer options that must be at least 1 (counts, steps, sizes), checked on construction.
    positive: ClassVar[tuple[str, ...]] = ()

    def resolved_options(self) -> dict[str, Any]:
        """The options given as ``auto`` and the value each took for the model that ran (``{"port": "qwen25vl"}``):
        runs record them (``method_resolved``), so that a record names the rule that ran. A ``port`` option (VScan,
        FlowCut) is resolved in place by the adapters of the families with a port; ``auto`` left unresolved runs the
        LLaVA (CLIP) rule. Empty for methods without ``auto`` options."""
        port = getattr(self, "port", None)
        return {} if port is None else {"port": "llava" if port == "auto" else port}

    def __post_init__(self) -> None:
        try:
            ratio = float(self.prune_ratio)
        except (TypeError, ValueError):
            raise ConfigError(f"ratio must be a number in [0, 1), got {self.prune_ratio!r}") from None
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(f"ratio must be in [0, 1) (the fraction of visual tokens removed), got {ratio}")
        self.prune_ratio = ratio
        for key, allowed in self.choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{self.name}: {key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        for key in self.positive:
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"{self.name}: {key} must be >= 1, got {getattr(self, key)}")

    @property
    def name(self) -> str:
        """The registered name (``conf/method/<name>.yaml``, :mod:`methods.registry`)."""
        from methods.registry import name_of

        return name_of(type(self))

    def selection_flops(self, cost) -> int:
        """FLOPs (2 x multiply-adds) of the method's own scoring and selection matrix products for a batch.

        ``cost`` is a :class:`bench.measure.flops.CostModel`: the batch's shapes, the model's widths and the
        cost of the model work the method asks for. Every method states its own (0 where it runs no matrix
        product); the base class has none, so a new method is never reported without its selection cost.
        """
        raise NotImplementedError(f"{type(self).__name__} defines no selection_flops")

    @property
    def projects_own_tokens(self) -> bool:
        """Whether :meth:`reduce` runs the projector itself on the tokens it keeps (``ctx.get("projector")`` on
        tower features) and reads only the shape, dtype and device of its ``vis`` argument. The adapter then
        skips the projector on all ``N`` tokens and passes a placeholder of that shape, as the official code
        of such methods projects only what it keeps (VisionZip, PruMerge)."""
        return False

    @property
    def budget_mode(self) -> str:
        """How the budget is counted: pre-LLM and in-tower methods keep exactly ``n_keep(N)`` tokens."""
        return "pre_llm_exact" if self.stage in ("none", "pre_llm") else f"{self.stage}_exact"

    def budget_fields(self, n_vis: int, n_layers: int, kept: float | None, per_layer: list[float] | None) -> dict[str, Any]:
        """The record's budget keys: ``budget_mode``, ``budget_tokens`` (``B = n_keep(N)``, the budget asked
        for), ``budget_measure`` (the count it names: ``kept`` here), ``budget_measured`` (that count,
        measured: mean over samples) and ``budget_met`` (within one token of ``B``; null when unmeasured).
        A row whose budget is not met is shown under its measured count, never under ``B``."""
        target = self.n_keep(n_vis)
        return {"budget_mode": self.budget_mode, "budget_tokens": target, "budget_measure": "kept",
                "budget_measured": None if kept is None else round(float(kept), 3),
                "budget_met": None if kept is None else abs(float(kept) - target) <= 1.0}

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
        if self.prune_ratio == 0.0:
            return keep_all(vis)
        return gather_selection(vis, self.select(vis, ctx))

    def describe(self) -> dict[str, Any]:
        """Settings that identify this method's behaviour (go into records and lmms-eval ``model_args``)."""
        from dataclasses import asdict

        return {"method": self.name, **asdict(self)}


class CudaGraphCache:
    """Opt-in CUDA-graph replay of a pure tensor function (a method's selection, a merging tower).

    At batch 1 a selection is a few dozen tiny kernels, so its eager cost is Python dispatch and
    launch latency, not GPU work; replaying a captured graph removes both. ``fn(*tensors)`` must be
    capturable: no host synchronisation (``.item()``, ``.tolist()``, ``nonzero``, boolean-mask
    indexing), no output shape that depends on values, no CPU tensor read inside. Its result may be
    a tensor, ``None`` or a (nested) tuple/list of those; CPU tensors in it are returned as captured
    (they must be constants, e.g. ``n_kept`` of a fixed budget).

    One graph per input signature (shape, stride, dtype, device of every argument). A call copies
    its arguments into the graph's static inputs, replays, and returns clones of the static outputs
    (so a later replay never overwrites a result the caller holds). The replay runs the very kernels
    that the eager call runs, in the same order, so outputs are bit-identical to ``fn``'s eager result
    as long as ``fn`` is deterministic (no float atomics).
    """

    def __init__(self, fn: Callable[..., Any], warmup: int = 2) -> None:
        self.fn = fn
        self.warmup = warmup
        self.graphs: dict[tuple, tuple[list[torch.Tensor], Any, Any]] = {}

    @staticmethod
    def signature(args: tuple[torch.Tensor, ...]) -> tuple:
        return tuple((tuple(a.shape), a.stride(), a.dtype, a.device) for a in args)

    @torch.no_grad()
    def capture(self, args: tuple[torch.Tensor, ...]):
        static = [a.clone() for a in args]
        side = torch.cuda.Stream(device=static[0].device)
        side.wait_stream(torch.cuda.current_stream(static[0].device))
        with torch.cuda.stream(side):  # warm-up (lazy init, Triton compilation, cuBLAS handles) off the capture
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream(static[0].device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.fn(*static)
        entry = (static, graph, out)
        self.graphs[self.signature(args)] = entry
        return entry

    @torch.no_grad()
    def __call__(self, *args: torch.Tensor):
        entry = self.graphs.get(self.signature(args)) or self.capture(args)
        static, graph, out = entry
        for s, a in zip(static, args):
            s.copy_(a)
        graph.replay()
        return _clone_outputs(out)


def _clone_outputs(out):
    if isinstance(out, torch.Tensor):
        return out.clone() if out.is_cuda else out
    if isinstance(out, (tuple, list)):
        return type(out)(_clone_outputs(o) for o in out)
    return out
