"""CDPruner: visual-token pruning by maximising conditional diversity (a question-conditioned DPP).

Paper: Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in
MLLMs", https://arxiv.org/abs/2506.10967 (code: Theia-4869/CDPruner, ``llava/model/llava_arch.py::encode_images``
and the CLIP text tower in ``llava/model/multimodal_encoder/clip_encoder.py``).

What the official code does, per image, and what decides the kept set here:

* **similarity** ``S = x_n @ x_n^T`` in float32 of the *projected* tokens (``mm_projector`` output, ``(N, D_llm)``)
  normalised in the model's dtype;
* **relevance** to the question in CLIP's joint space: image side ``visual_projection(post_layernorm(h[-2][:, 1:])
  .float())`` (CLS dropped), text side the CLIP text tower's ``text_embeds`` of the question cut into ``M``
  77-token chunks; both L2-normalised, ``r_i = mean_m(-(e_i . t_m))``. The minus sign is deliberate (the
  maintainers' issues 9, 14 and 22): the tokens *least* similar to the question score highest;
* **min-max** ``r = (r - min r + 1e-6) / (max r - min r)`` over the batch the official code encodes at once (one
  image at batch 1 on LLaVA-1.5); here per sample: the official value, independent of batch neighbours. On
  LLaVA-NeXT (anyres) an image's tiles are one official batch: ``T`` picks per tile, min-max over all its tiles,
  the DPP batched; the adapter passes them as one call (``extras["clip_joint_batch"]``) and unpads the masks;
* **kernel** ``L_ij = (r_i * S_ij) * r_j`` (float32) and **greedy MAP inference** of the DPP (Chen et al. 2018,
  incremental Cholesky): exactly ``T`` steps, ``j = argmax d_i^2`` (first index on ties), ``e = (L_j - c_{:i,j}^T
  c_{:i}) / sqrt(d_j^2)``, ``d^2 -= e^2``, ``d_j^2 = -inf``. Candidates often differ in the last float32 bits, so
  the arithmetic (an ``einsum`` over the ``(T, B, N)`` rows ``c``) follows the official order;
* the picks become a boolean index mask, so kept tokens reach the LLM in raster order. If the kernel's rank is
  exhausted before ``T`` steps (``T > D``, e.g. a tiny model), the official ``sqrt`` of a non-positive number
  repeats picks and the mask holds fewer than ``T``: kept as is (``n_kept`` says how many), never topped up.

``T = round(N (1 - prune_ratio))`` (official ``--visual_token_num``). The official code's commented-out ``theta``
(``r <- exp(theta / (2 (1 - theta)) r)``) is :attr:`CDPruner.theta`, off by default. The question reaches CLIP's
text tower through the adapter (``bench.models.clip_text``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import PruningMethod, VisionContext, VisualSelection
from methods.cdpruner_parts import chunk_mean, picks_to_kept, theta_option


def conditional_kernel(vis: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor, n_chunks: torch.Tensor,
                       theta: float | None = None, joint: bool = False) -> torch.Tensor:
    """The conditional DPP kernel ``L = diag(r) S diag(r)``: ``(B, N, N)`` float32 (float64 for float64 inputs).

    ``vis`` ``(B, N, D)`` projected tokens (model dtype); ``image_embeds`` ``(B, N, C)`` the same tokens in CLIP's
    joint space and ``text_embeds`` ``(B, M, C)`` each question's chunks (float32, not normalised; rows past
    ``n_chunks[b]`` ``(B,)`` are padding); ``theta``: the relevance exponent (``None``: off, official); ``joint``:
    min-max over the whole batch at once (the official ``relevance.min()``; on LLaVA-NeXT one image's tiles).
    """
    # float32 as the official .float() (float64 inputs stay float64: the tests' exact references)
    xn = (vis / vis.norm(dim=-1, keepdim=True)).to(torch.promote_types(vis.dtype, torch.float32))
    similarity = torch.matmul(xn, xn.transpose(1, 2))
    image_embeds, text_embeds = image_embeds.to(xn.dtype), text_embeds.to(xn.dtype)
    ie = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    te = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = chunk_mean(-torch.matmul(ie, te.transpose(1, 2)), n_chunks)  # (B, N)
    lo = relevance.amin() if joint else relevance.amin(dim=1, keepdim=True)
    hi = relevance.amax() if joint else relevance.amax(dim=1, keepdim=True)
    relevance = (relevance - lo + 1e-6) / (hi - lo)
    if theta is not None:
        relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
    return relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)


def greedy_dpp(kernel: torch.Tensor, t: int) -> torch.Tensor:
    """Fast greedy MAP inference of a DPP: ``(B, N, N)`` float32 kernel -> ``(B, t)`` picks in pick order (exactly
    ``t`` steps, batched, no host sync; the arithmetic of the official loop)."""
    b, n, _ = kernel.shape
    rows = torch.arange(b, device=kernel.device)
    cis = torch.zeros((t, b, n), device=kernel.device, dtype=kernel.dtype)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    picks = torch.empty((t, b), dtype=torch.long, device=kernel.device)
    for i in range(t):
        j = torch.argmax(di2s, dim=-1)
        picks[i] = j
        eis = (kernel[rows, j] - torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])) / torch.sqrt(di2s[rows, j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s.scatter_(1, j.unsqueeze(1), -float("inf"))  # a device-side fill: capturable in a CUDA graph
    return picks.t()


@dataclass
class CDPruner(PruningMethod):
    """CDPruner with the official rule; keeps ``round(N (1 - prune_ratio))`` tokens (official ``visual_token_num``).

    Parameters
    ----------
    theta : float, optional
        Relevance exponent of the paper's kernel variant, commented out in the official code; ``None`` (official):
        the min-max-normalised relevance as is. In ``[0, 1)`` when set.
    """

    theta: float | None = None

    needs: ClassVar[frozenset[str]] = frozenset({"clip_image_embeds", "clip_text_embeds", "clip_text_chunks"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.theta = theta_option(self.theta)

    def kernel(self, vis: torch.Tensor, ctx: VisionContext) -> torch.Tensor:
        """``(B, N, N)`` conditional kernel of a batch, from the adapter's CLIP quantities."""
        return conditional_kernel(vis, ctx.get("clip_image_embeds"), ctx.get("clip_text_embeds"), ctx.get("clip_text_chunks"), self.theta)

    def select_with_counts(self, vis: torch.Tensor, ctx: VisionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, N, D)`` projected tokens -> ``(B, T)`` ascending kept indices and ``(B,)`` valid counts.

        One sample at a time: GEMM kernels are chosen by batch size, and the DPP's near-ties would turn a batched
        product's last bits into another kept set; per sample, each gets the official batch-1 arithmetic.
        """
        n, t = vis.shape[1], self.n_keep(vis.shape[1])
        img, txt, chunks = ctx.get("clip_image_embeds"), ctx.get("clip_text_embeds"), ctx.get("clip_text_chunks")
        if "clip_joint_batch" in ctx.extras and ctx.get("clip_joint_batch"):
            # LLaVA-NeXT: the rows are one image's tiles, one official batch (module docstring)
            m = int(chunks.max())
            return picks_to_kept(greedy_dpp(conditional_kernel(vis, img, txt[:, :m], chunks, self.theta, joint=True), t), n)
        picks = []
        for i in range(vis.shape[0]):
            m = int(chunks[i])
            k = conditional_kernel(vis[i : i + 1], img[i : i + 1], txt[i : i + 1, :m], chunks[i : i + 1], self.theta)
            picks.append(greedy_dpp(k, t))
        return picks_to_kept(torch.cat(picks), n)

    def select(self, vis: torch.Tensor, ctx: VisionContext) -> torch.Tensor:
        """``(B, T)`` ascending kept indices (rows past a degenerate kernel's count are padding; see :meth:`reduce`)."""
        return self.select_with_counts(vis, ctx)[0]

    def reduce(self, vis: torch.Tensor, ctx: VisionContext) -> VisualSelection:
        b, n, d = vis.shape
        if self.prune_ratio == 0.0:
            return super().reduce(vis, ctx)
        idx, n_kept = self.select_with_counts(vis, ctx)
        feats = vis.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))
        return VisualSelection(feats, idx, n_kept.cpu())

    def selection_flops(self, cost) -> int:
        """Per image: the CLIP text tower on the question's chunks (``cost.shapes.text_tower_flops``, from the
        adapter), the visual projection into CLIP's joint space (``2 N D_vis C``), the relevance (``2 N C M``),
        the ``N x N`` cosine matrix of the projected tokens (``2 N^2 D_llm``) and the greedy DPP's ``einsum`` (step ``i``
        is a ``1 x i`` by ``i x N`` product: ``N T (T - 1)``, less step 1's, which torch runs elementwise)."""
        if self.prune_ratio == 0.0:
            return 0
        n, t, sh = cost.n_visual, self.n_keep(cost.n_visual), cost.shapes
        proj = getattr(sh, "clip_projection_dim", 0) or 0
        chunks = getattr(sh, "text_chunks", None) or (1,) * cost.batch
        per_image = 2 * n * cost.vision_width * proj + 2 * n * n * cost.llm_width + n * t * (t - 1) - 2 * n * int(t >= 2)
        return int(cost.batch * per_image + sum(2 * n * proj * m for m in chunks) + (getattr(sh, "text_tower_flops", 0) or 0))
