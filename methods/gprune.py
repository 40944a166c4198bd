"""G-Prune: graph-based token pruning by information propagation over a feature-similarity graph.

Paper: https://arxiv.org/abs/2501.02268 (code: jytmelon/G-Prune,
``LLaVA-NeXT/llava/model/llava_arch.py::prepare_inputs_labels_for_multimodal``, lines ~239-290).

What the official code does, per image, on the *projected* visual tokens ``x`` (``(N, D)``, the
LLM-side features, in the model's dtype):

* ``A = normalize(x) @ normalize(x)^T``; entries below ``similarity = 0.5`` are set to 0, the rest
  divided by ``temperature = 0.03``; entries with ``|A| < 1e-6`` (the zeroed ones) become ``-5000``;
  a row softmax turns ``A`` into a transition matrix whose zero entries stay exactly 0;
* ``degree = (A > 0).sum(row)`` (the graph degree, self loop included);
* ``A^5`` (``torch.matrix_power``, ``iterate_num = 5``), ``score = (|x|_2)^T A^5 / degree``: each
  token's feature norm is propagated five steps along the graph;
* ``topk(int(keep_ratio * N))`` by score, then sorted: kept tokens in raster order. The budget
  rounds *down* (``int``): 1/3 of 576 gives 191, 0.1 gives 57 (the harness rounds elsewhere; the
  option ``rounding: round`` gives ``round(N (1 - ratio))`` for equal-budget comparisons);
* kept tokens keep their *original* position ids (``position_ids = keep_indices``, decode steps
  continue at ``last + 1``); ``renumber_positions: true`` gives the contiguous ids of other pre-LLM
  methods instead.

The official ``keep_ratio = 0.5`` (line 241) is hard-coded; here it is ``1 - prune_ratio``.

Port (documented deviation, methods.md 1b policy): the official code handles only LLaVA-NeXT input
(base image: 576 tokens, plus the unpadded high-resolution grid scored as a second graph, its
row-end newline tokens always kept); on a single LLaVA-1.5 image it raises ``UnboundLocalError``,
and it applies batch element 0's selection only. Here the rule runs per image (one graph per image,
the base-image branch of the official code) and per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from bench.errors import ConfigError
from methods.base import PruningMethod, VisionContext


def gprune_scores(x: torch.Tensor, similarity: float = 0.5, temperature: float = 0.03, iterations: int = 5) -> torch.Tensor:
    """Propagated feature-norm scores: ``(B, N, D)`` tokens -> ``(B, N)`` in ``x``'s dtype.

    The operations and their order follow the official code (``normalize``, a ``@`` product,
    in-place thresholding, row softmax, ``matrix_power``), batched over ``B``.
    """
    xn = F.normalize(x, p=2, dim=-1)
    a = xn @ xn.transpose(1, 2)  # (B, N, N)
    a = a.masked_fill(a < similarity, 0.0) / temperature
    a = a.masked_fill(a.abs() < 1e-6, -5000.0).softmax(dim=-1)
    degree = (a > 0).sum(dim=-1)  # (B, N)
    a = torch.linalg.matrix_power(a, iterations)
    w = x.norm(dim=-1).unsqueeze(1).to(a.dtype)  # (B, 1, N)
    return (w @ a).squeeze(1) / degree


@dataclass
class GPrune(PruningMethod):
    """G-Prune with the official hyper-parameters; keeps ``int((1 - prune_ratio) * N)`` tokens.

    Parameters
    ----------
    similarity : float
        Edge threshold on the cosine similarity (official 0.5).
    temperature : float
        Softmax temperature of the edge weights (official 0.03).
    iterations : int
        Propagation steps, the matrix power (official 5).
    rounding : {"floor", "round"}
        ``floor`` (official ``int(keep_ratio * N)``) or ``round`` (the harness's ``round(N (1 - ratio))``).
    renumber_positions : bool
        ``False`` (official): kept tokens keep their original position ids; ``True``: contiguous ids.
    """

    similarity: float = 0.5
    temperature: float = 0.03
    iterations: int = 5
    rounding: str = "floor"
    renumber_positions: bool = False

    graph_safe: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rounding not in ("floor", "round"):
            raise ConfigError(f"gprune: rounding must be floor or round, got {self.rounding!r}")
        if int(self.iterations) < 1 or float(self.temperature) <= 0:
            raise ConfigError(f"gprune: iterations must be >= 1 and temperature > 0, got {self.iterations}, {self.temperature}")

    def n_keep(self, n: int) -> int:
        if self.prune_ratio == 0.0 or self.rounding == "round":
            return super().n_keep(n)
        return max(1, math.floor((1.0 - self.prune_ratio) * n))

    def select(self, vis: torch.Tensor, ctx: VisionContext) -> torch.Tensor:
        """``(B, N, D)`` projected tokens -> ``(B, K)`` sorted indices of the top propagated scores."""
        s = gprune_scores(vis, float(self.similarity), float(self.temperature), int(self.iterations))
        return s.topk(self.n_keep(vis.shape[1]), dim=1).indices.sort(dim=1).values

    def selection_flops(self, cost) -> int:
        """Per image: the ``N x N`` Gram matrix of the projected tokens, ``matrix_power``'s products
        (square-and-multiply), the ``1 x N`` propagation."""
        if self.prune_ratio == 0.0:
            return 0
        n, it = cost.n_visual, int(self.iterations)
        products = it.bit_length() - 1 + bin(it).count("1") - 1
        return cost.batch * (2 * n * n * cost.llm_width + products * 2 * n**3 + 2 * n * n)
