"""Pruning inside the LLM: forward pre-hooks on the decoder layers of a transformers Llama LM.

:func:`prune_in_llm` applies an ``in_llm`` method (``methods/inllm.py``) to a LLaVA model without
touching transformers' modeling code. It installs

* a forward pre-hook (with kwargs) on the language model (``LlamaModel``) that reads each call's 2-D
  attention mask and KV-cache length, to tell prefill from decoding;
* a forward pre-hook (with kwargs) on every decoder layer from the first pruning layer on. At a
  pruning layer during prefill it asks the method for the kept indices and gathers the hidden states;
  from the first pruning layer on it replaces the layer's ``attention_mask``, ``position_ids`` and
  ``position_embeddings`` (original ids, or renumbered, as the method's stage says);
* forward hooks on ``q_proj``/``k_proj`` of the layers whose attention a method scores on their own
  input (FastV's layer K-1, DART's keys, SparseVLM's scoring layers), so attention rows are recomputed
  from tensors the layer already produced: ``softmax(q_rows . K^T / sqrt(d) + causal/padding mask)``
  under SDPA, never by switching the model to eager attention. Under SDPA the scored layers also hand
  over the post-RoPE q/k they attend with (the ``"sdpa"`` entry of transformers' attention interface is
  wrapped while the context is open, :func:`_tap_attention`), so nothing is rotated again; otherwise
  (eager attention) the keys come from the KV cache when it is visible, or q/k are rotated from the
  projections' outputs (:func:`apply_rope`: one Triton kernel on CUDA, :mod:`bench.models.fused`; two torch
  kernels elsewhere); a layer scored on its own input gets its input norm from one Triton kernel too;
* whatever extra hooks a method installs (TransPrune's sublayer input/output hooks), routed through
  :meth:`_Runner.sub_hook`.

Cost model. Batch-1 prefill and every decoding step are CPU-launch-bound on an H100, so the hooks
count kernels, not FLOPs:

* nothing ever synchronises with the device (no ``.item()``, ``.tolist()``, ``nonzero``, boolean
  indexing), so a pruned prefill can be captured in a CUDA graph (:class:`bench.measure.latency.GraphPrefill`);
* the attention mask of the pruned layers follows the model's own choice for the call: where
  transformers passes ``None`` (no padding; SDPA then runs its causal flash kernel), pruned layers get
  ``None`` too; only padded batches (or a graph capture, where transformers always builds the mask)
  get a 4-D mask over the pruned sequence. A mask where the model has none would put pruned layers
  on a slower SDPA kernel than the unpruned model;
* index tensors that depend only on the layout (sources of the non-visual tokens, masks, renumbered
  positions and their rotary tables, attention biases of the scored rows) are built once per stage
  and sequence length and reused by every later prefill inside the context;
* decoder layers before the first pruning layer get no hook; after a prefill, the cache of every
  pruned layer holds only kept tokens, and a decoding step costs, per stage and per call (not per
  layer): nothing when the stage keeps original position ids and the batch has no padding; one
  table lookup for shifted (renumbered) positions; one concatenation for a padding mask.

Because pruned layers receive only the kept tokens, their KV cache holds only the kept tokens; each
decoding step then gets, per pruned stage, a mask over that stage's cache (kept prefix + generated
tokens) and positions shifted by the number of dropped tokens when the stage renumbers. Pruning happens
once at prefill (a call whose cache is empty); a forward without a cache prunes again on every call,
which is FastV's re-pruning mode when ``generate`` runs with ``use_cache=False``.

Batches: all samples keep the same number of visual tokens at each stage, so left padding and each
sample's prefix length are unchanged; every sample gathers its own indices, and masks hide padding, so
a sample's output does not depend on its neighbours.

Records ``prepared.extras["visual_tokens_per_layer"]`` (``(B, L)`` LongTensor: visual tokens, merged
ones included, entering each LLM layer) and ``prepared.extras["llm_stages"]`` (per stage: layer,
count, and kept indices into the original ``N`` visual tokens, ``-1`` for merged tokens).

This module must not import lmms-eval, hydra, wandb or datasets (the GPU machine has none of them).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from bench.errors import IncompatibleMethodError
from bench.models import fused
from kernels import HALF, available

__all__ = ["apply_rope", "attention_rows", "prune_in_llm", "rms_norm", "rope_table"]


# ----------------------------------------------------------------------------------- pure helpers
def rope_table(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``(B or 1, T, 2, 2, d/2)`` rotary factors per position for :func:`apply_rope`: ``[[c1, s2], [-s1, c2]]``.

    ``cos``/``sin`` are ``(B or 1, T, d)`` with halves ``c1, c2`` / ``s1, s2``. Row ``i`` multiplies the
    ``i``-th half of ``x``: ``x1`` goes to ``(c1, s2)``, ``x2`` to ``(-s1, c2)``. Two kernels (neg, stack);
    built once per context where the tables depend on the layout only.
    """
    h = cos.shape[-1] // 2
    parts = (cos[..., :h], sin[..., h:], -sin[..., :h], cos[..., h:])
    return torch.stack(parts, dim=-2).view(*cos.shape[:-1], 2, 2, h)


def apply_rope(x: torch.Tensor, table: torch.Tensor, heads_first: bool = True) -> torch.Tensor:
    """Llama's rotary embedding ``x * cos + rotate_half(x) * sin``, bit for bit, in two kernels (on CUDA
    half/bfloat16 with Triton: one, :func:`bench.models.fused.rope`, the same values).

    Parameters
    ----------
    x : torch.Tensor
        ``(B, T, H, d)``: a q/k projection's output split into heads (not yet transposed).
    table : torch.Tensor
        ``(B or 1, T, 2, 2, d/2)`` from :func:`rope_table`.
    heads_first : bool
        Return ``(B, H, T, d)`` contiguous in that layout (what the score matmul reads without a copy);
        ``False``: ``(B, T, H, d)`` contiguous (heads concatenate per token with a view).

    ``rotate_half(x) = cat(-x2, x1)``, so the first output half is ``x1*c1 + x2*(-s1)`` and the second
    ``x2*c2 + x1*s2``. One broadcast multiply forms the four half products (each rounded once, as
    Llama's ``x * cos`` and ``rotate_half(x) * sin``; ``(-a) * b == a * (-b)`` exactly) and one add sums
    the two that land on each half (IEEE addition commutes): no ``roll``/``neg``/``cat`` of ``x`` and two
    passes over it instead of four.
    """
    if available(x, dtypes=HALF) and table.dtype == x.dtype:  # the same values in one kernel (one read, one write)
        return fused.rope(x, table, heads_first)
    b, t, h, d = x.shape
    xs = x.view(b, t, h, 2, 1, d // 2)
    w = table.unsqueeze(2)  # (B or 1, T, 1, 2, 2, d/2)
    if heads_first:
        prod = x.new_empty(b, h, t, 2, 2, d // 2)
        torch.mul(xs.transpose(1, 2), w.transpose(1, 2), out=prod)
    else:
        prod = xs * w  # (B, T, H, 2, 2, d/2)
    out = torch.add(prod.select(-3, 0), prod.select(-3, 1))  # (..., 2, d/2): the two halves, contiguous
    return out.view(b, h, t, d) if heads_first else out.view(b, t, h, d)


def rms_norm(norm: torch.nn.Module, x: torch.Tensor, exact: bool = True, llama: bool = True) -> torch.Tensor:
    """``norm(x)``; transformers' ``LlamaRMSNorm`` on CUDA half/bfloat16 in one kernel less, bit for bit.

    Llama computes ``weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)``. On CUDA a multiply of the
    half input by the fp32 ``rsqrt`` column computes in fp32 (the common dtype; the half -> fp32
    conversion is exact) and rounds once when it stores into a half output, which is that product and
    its cast in one kernel. Other norms, hooked norms, fp32 and CPU (where TensorIterator would add the
    cast back as a temporary) call the module.

    ``llama`` says ``norm`` is Llama's RMSNorm (``ModelAdapter.is_llama_rms_norm``); otherwise the module runs.

    ``exact=False`` (the scoring recompute of a layer's input, :meth:`_View._norm_input`): one Triton
    kernel instead of five, equal but for the mean's fp32 summation order (:mod:`bench.models.fused`).
    """
    if (not llama or not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16)
            or norm._forward_hooks or norm._forward_pre_hooks or norm.weight.dtype != x.dtype):
        return norm(x)
    if not exact and available(x, dtypes=HALF):
        return fused.rms_norm(norm, x)
    var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    y = torch.empty_like(x)
    torch.mul(x, torch.rsqrt(var + norm.variance_epsilon), out=y)
    return norm.weight * y


def attention_rows(
    q: torch.Tensor, k: torch.Tensor, q_index: torch.Tensor | None, key_valid: torch.Tensor | None, scaling: float,
    allowed: torch.Tensor | None = None, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention probabilities for a few query rows.

    Parameters
    ----------
    q : torch.Tensor
        ``(B, H, Q, d)`` post-RoPE queries of the rows.
    k : torch.Tensor
        ``(B, H_kv, T, d)`` post-RoPE keys of the whole sequence (``H % H_kv == 0``).
    q_index : torch.LongTensor or None
        ``(Q,)`` sequence positions of the query rows (causality: key ``j`` is visible iff ``j <= q_index``).
    key_valid : torch.BoolTensor or None
        ``(B, T)``; padding keys are masked.
    scaling : float
        ``1/sqrt(d)``.
    allowed : torch.BoolTensor, optional
        ``(B or 1, 1, Q, T)`` precomputed ``causal & key_valid`` (then ``q_index``/``key_valid`` are unused).
    bias : torch.Tensor, optional
        ``(B or 1, 1, Q, T)`` precomputed additive mask (0 where visible, the dtype's minimum elsewhere),
        in the logits' dtype; takes precedence over ``allowed``. With neither ``bias``, ``allowed``
        nor ``q_index``, every key is visible (the last row of an unpadded sequence).

    Returns
    -------
    torch.Tensor
        ``(B, H, Q, T)`` probabilities, softmax in fp32 then cast to ``q.dtype`` as eager attention does.
    """
    h, hkv = q.shape[1], k.shape[1]
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2))
    if bias is None and allowed is None and q_index is not None:
        allowed = _rows_allowed(q_index, key_valid)
    if bias is not None:
        # one kernel for scale + mask; visible entries round exactly as eager's ``logits * scaling``
        logits = torch.add(bias, logits, alpha=scaling)
    else:
        logits = logits * scaling
        if allowed is not None:
            logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    # fp32 softmax then cast, not a half-output softmax: on the H100 those differ in the last bit for
    # rows longer than 1024 keys (CUDA's block softmax path), so the cast stays
    return torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)


def _rows_allowed(q_index: torch.Tensor, key_valid: torch.Tensor | None, t: int | None = None) -> torch.Tensor:
    """``(B or 1, 1, Q, T)``: key ``j`` visible from row ``q_index[r]`` (causal) and not padding (``key_valid=None``: ``T = t``)."""
    t = key_valid.shape[1] if key_valid is not None else t
    allowed = (torch.arange(t, device=q_index.device).view(1, t) <= q_index.view(-1, 1)).view(1, 1, -1, t)
    if key_valid is None:
        return allowed
    return allowed & key_valid.view(key_valid.shape[0], 1, 1, t)


def _bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _mask4d(valid: torch.Tensor, q_len: int, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """4-D mask for the last ``q_len`` queries over keys ``valid`` ``(B, T)``: causal + padding.

    Fully masked rows (queries on left padding) attend to themselves so no row is all -inf.
    """
    b, t = valid.shape
    if q_len == 1:  # a decoding step: every cached key precedes the query; only padding is masked
        allowed = valid.view(b, 1, 1, t)
    else:
        qi = torch.arange(t - q_len, t, device=valid.device).view(q_len, 1)
        kj = torch.arange(t, device=valid.device).view(1, t)
        allowed = (((kj <= qi).view(1, q_len, t) & valid.view(b, 1, t)) | (kj == qi).view(1, q_len, t)).unsqueeze(1)
    if impl == "sdpa":
        return allowed
    return _bias(allowed, dtype)


#: :meth:`_View.attn_rows` rotates a layer's query rows and keys in one pass where it can (a switch for
#: the GPU test that compares it with the two separate rotations bit for bit)
FUSE_QK = True


# ----------------------------------------------------------------------------------- attention tap
_TAPS: dict[int, Any] = {}  # id(attention module) -> callback(query, key) while a pruning context is open
_TAP_STATE: dict = {"open": 0}


def _tapped_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention function, reporting the post-RoPE ``query``/``key`` of tapped modules first."""
    tap = _TAPS.get(id(module))
    if tap is not None:
        tap(query, key)
    return _TAP_STATE["orig"](module, query, key, value, attention_mask, **kwargs)


def _tap_attention(modules: dict) -> Any:
    """Route the ``"sdpa"`` attention function through :func:`_tapped_sdpa` for ``modules``
    (``{attention module: callback(query, key)}``); returns the undo function (``None``: no tap possible).

    Scored layers then hand over the rotated q/k they attend with, so the hooks rotate nothing (the
    recomputation from the ``q_proj``/``k_proj`` outputs stays as the fallback, e.g. eager attention, which
    is not routed through the interface). The function the interface returns is only wrapped: the
    attention computed is the model's own.
    """
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as funcs
    except ImportError:  # pragma: no cover - other transformers layouts: recompute instead
        return None
    if _TAP_STATE["open"] == 0:
        local = getattr(funcs, "_local_mapping", None)
        if local is None or "sdpa" not in funcs:
            return None
        _TAP_STATE.update(orig=funcs["sdpa"], had_local="sdpa" in local, prev=local.get("sdpa"))
        funcs["sdpa"] = _tapped_sdpa
    _TAP_STATE["open"] += 1
    for mod, fn in modules.items():
        _TAPS[id(mod)] = fn

    def undo():
        for mod in modules:
            _TAPS.pop(id(mod), None)
        _TAP_STATE["open"] -= 1
        if _TAP_STATE["open"] == 0:
            if _TAP_STATE["had_local"]:
                funcs["sdpa"] = _TAP_STATE["prev"]
            else:
                del funcs["sdpa"]
            _TAP_STATE.pop("orig")

    return undo


# ----------------------------------------------------------------------------------- runtime state
@dataclass
class _Seq:
    """The token sequence seen by the layers of one stage (prefill layout)."""

    valid: torch.Tensor  # (B, T) bool
    pos: torch.Tensor  # (B, T) position ids used by the layers
    vis_start: torch.Tensor  # (B,)
    n_vis: int
    shift: int = 0  # decode positions = original ids - shift
    layer: int = 0
    static: dict = field(default_factory=dict)  # layout-only tensors of this sequence (query rows, biases)
    pos_static: bool = True  # ``pos`` (so ``pe``) depends on the layout only (not on which tokens were kept)
    mask: Any = None
    pe: Any = None
    # per-call decode state (built once per call, shared by every layer of the stage)
    call_id: int = -1
    dec_mask: Any = None
    dec_pe: Any = None
    dec_pos: torch.Tensor | None = None


def _expand_b(x: torch.Tensor, b: int) -> torch.Tensor:
    return x if x.shape[0] == b else x.expand(b, *x.shape[1:])


@dataclass
class _Runner:
    adapter: Any
    method: Any
    prepared: Any
    plan: list
    impl: str
    n0: int
    captures: dict = field(default_factory=dict)  # layer -> {"q_rot", "k_rot" (tap) or "q", "k" (hooks), "pe", "seq"}
    capture_layers: frozenset = frozenset()
    seqs: list = field(default_factory=list)  # _Seq per executed stage
    stage_of_layer: list = field(default_factory=list)
    stages_at: dict = field(default_factory=dict)  # layer -> [stage index, ...]
    prefill: bool = True
    call_id: int = 0
    mask2d: torch.Tensor | None = None  # the call's 2-D attention mask (None: no padding)
    cache: Any = None
    q_len: int = 0
    t0: int = 0  # length of the last prefill (original layout)
    mask_none: bool = False  # transformers passed no 4-D mask this call (no padding)
    spans_dev: torch.Tensor | None = None  # image spans on the model device (copied once, outside the forward)
    vis_start_min: int = 0  # host copies: no device->host sync when choosing rows and slices
    uniform_start: bool = False  # every sample's image starts at the same position (slices instead of gathers)
    static: dict = field(default_factory=dict)  # (stage, T) -> layout-only index tensors, kept for the whole context
    method_static: dict = field(default_factory=dict)  # from method.runtime_setup (seeded noise, ...)
    state: dict = field(default_factory=dict)  # per-prefill method state (raters, accumulated scores)
    keeps: list = field(default_factory=list)  # (keep, extra) per executed stage of the last prefill
    rope_table: tuple | None = None  # (cos, sin) ``(P, d)`` by position: shifted decode positions
    call_pos: torch.Tensor | None = None  # position ids given to the LLM this call
    capturing: bool = False  # this prefill is being captured in a CUDA graph (its tensors hold no values)
    query_offset: int = 0  # the "last" query row sits this many tokens before the sequence's end (``llm_query_offset``)

    @property
    def lm(self):
        return self.adapter.language_model

    @property
    def llama_norm(self) -> bool:
        """Whether the LM's norms are Llama's RMSNorm (the adapter says; :func:`rms_norm`'s fused path)."""
        if "llama_norm" not in self.static:
            self.static["llama_norm"] = bool(self.adapter.is_llama_rms_norm(self.lm.norm))
        return self.static["llama_norm"]

    # ------------------------------------------------------------------ hooks
    def lm_pre(self, module, args, kwargs):
        emb = kwargs.get("inputs_embeds")
        if emb is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            b, q = ids.shape[:2]
            device = ids.device
        else:
            b, q = emb.shape[:2]
            device = emb.device
        # transformers <= 5.24 names the KV cache `past_key_values`; 5.25 passes it as `cache`.
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = kwargs.get("cache")
        past = int(cache.get_seq_length()) if cache is not None else 0
        mask2d = kwargs.get("attention_mask")
        if mask2d is not None and mask2d.dim() != 2:
            raise IncompatibleMethodError("in-LLM pruning needs a 2-D attention mask (or none) at the LLM input")
        self.call_id += 1
        self.prefill = past == 0
        self.mask2d = mask2d
        self.call_pos = kwargs.get("position_ids")
        self.cache = cache
        self.q_len = q
        if self.prefill:
            self.t0 = q
            self.capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
            key = ("seq0", b, q)
            seq0 = self.static.get(key)
            if seq0 is None:
                valid = mask2d[:, -q:].bool() if mask2d is not None else torch.ones(b, q, dtype=torch.bool, device=device)
                pos = kwargs.get("position_ids")
                if pos is None:
                    pos = torch.arange(q, device=device).view(1, q)
                seq0 = self.static[key] = (valid, _expand_b(pos, b) if pos.dim() == 2 else pos)
            self.seqs = [_Seq(valid=seq0[0], pos=seq0[1], vis_start=self.spans_dev[:, 0], n_vis=self.n0, layer=0,
                              static=self.static.setdefault(("seqstatic", 0, q), {}))]
            self.captures = {}
            self.keeps = []
            self.state = {}
        return None

    def layer_pre(self, layer: int, module, args, kwargs):
        if self.prefill:
            stages = self.stages_at.get(layer)
            if stages:
                from_args = len(args) > 0
                h = args[0] if from_args else kwargs["hidden_states"]
                cur = self.seqs[-1]
                if len(self.seqs) == 1:  # the original sequence: the model's own rotary tables and mask
                    cur.pe = kwargs.get("position_embeddings")
                    cur.mask = kwargs.get("attention_mask")
                    self.mask_none = cur.mask is None
                cap = self.captures.get(layer - 1)
                if cap is not None and "pe" not in cap:
                    cap["pe"] = cur.pe
                for j, i in enumerate(stages):
                    h = self._prune(i, self.plan[i], layer, h, more=j + 1 < len(stages))
                if from_args:
                    args = (h, *args[1:])
                else:
                    kwargs["hidden_states"] = h
            if len(self.seqs) > 1:
                cur = self.seqs[-1]
                kwargs["attention_mask"] = cur.mask
                kwargs["position_embeddings"] = cur.pe
                if cur.pos.dim() == 2:  # M-RoPE's (3, B, T) ids stay at the LM (its layers get text ids or None)
                    kwargs["position_ids"] = cur.pos
            return args, kwargs
        idx = self.stage_of_layer[layer]
        if idx <= 0 or idx >= len(self.seqs):
            return None
        cur = self.seqs[idx]
        if cur.call_id != self.call_id:
            self._decode_state(cur, kwargs)
        kwargs["attention_mask"] = cur.dec_mask
        if cur.dec_pe is not None:
            kwargs["position_embeddings"] = cur.dec_pe
            kwargs["position_ids"] = cur.dec_pos
        return args, kwargs

    def capture_out(self, layer: int, name: str, module, inputs, output):
        if self.prefill:
            cap = self.captures.setdefault(layer, {})
            cap[name] = output
            cap["seq"] = len(self.seqs)  # the cache of this layer holds this sequence's keys

    def capture_rot(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        """Post-RoPE ``(B, H, T, d)`` query and ``(B, H_kv, T, d)`` key of ``layer`` (from the attention tap)."""
        if self.prefill:
            cap = self.captures.setdefault(layer, {})
            cap["q_rot"], cap["k_rot"] = query, key
            # the projections' outputs (captured just before, in this layer's forward) are superseded:
            # every reader prefers the rotated pair, so they are dropped rather than carried along
            # (and gathered again) when a second stage prunes at the same boundary
            cap.pop("q", None)
            cap.pop("k", None)

    def sub_hook(self, fn, *args, **kwargs):
        """Method-installed hooks run through here (so the overhead script can find them)."""
        return fn(self, *args, **kwargs)

    # ------------------------------------------------------------------ decoding
    def _decode_state(self, cur: _Seq, kwargs) -> None:
        """Mask and positions of one stage for this decoding call (built once, used by all its layers)."""
        q = self.q_len
        model_mask = kwargs.get("attention_mask")
        if model_mask is None or self.mask2d is None:
            cur.dec_mask = None  # no padding: causal over the stage's own cache, as the model does
        else:
            new = self.mask2d[:, self.t0 :]
            dec_valid = torch.cat([cur.valid, new if new.dtype == torch.bool else new.bool()], dim=1)
            dtype = kwargs["position_embeddings"][0].dtype
            cur.dec_mask = _mask4d(dec_valid, q, self.impl, dtype)
        if cur.shift:
            pos = kwargs.get("position_ids")
            if pos is None:
                pos = self.call_pos
            if pos is None:
                past = self.mask2d.shape[1] - q if self.mask2d is not None else int(self.cache.get_seq_length())
                pos = torch.arange(past, past + q, device=kwargs["position_embeddings"][0].device).view(1, q)
            cur.dec_pos = pos - cur.shift
            cur.dec_pe = self._rope_at(cur.dec_pos, kwargs["position_embeddings"][0])
        else:
            cur.dec_pe = cur.dec_pos = None  # original ids: the model's own positions and rotary tables
        cur.call_id = self.call_id

    def _rope_at(self, pos: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary ``(cos, sin)`` ``(B, T, d)`` at positions ``pos`` from a table by position.

        The table comes from the model's own ``rotary_emb`` over ``arange(P)``; each entry is one fp32
        product ``inv_freq * position`` then cos/sin, so the lookup equals a direct call bit for bit.
        """
        need = (self.mask2d.shape[1] if self.mask2d is not None else 0) + self.q_len + 1
        if self.rope_table is None or self.rope_table[0].shape[0] < need:
            p = max(need + 512, 2 * (self.rope_table[0].shape[0] if self.rope_table else 0))
            dummy = like.new_zeros(1, 1, 1)
            cos, sin = self.lm.rotary_emb(dummy, torch.arange(p, device=like.device).view(1, p))
            self.rope_table = (cos[0], sin[0])
        cos, sin = self.rope_table
        return torch.nn.functional.embedding(pos, cos), torch.nn.functional.embedding(pos, sin)

    # ------------------------------------------------------------------ pruning
    def _layout(self, i: int, st, cur: _Seq, t_old: int, k: int, m: int, dtype, device) -> dict:
        """Index tensors of stage ``i`` that depend only on the layout (built once per sequence length)."""
        key = (i, t_old)
        lay = self.static.get(key)
        if lay is not None:
            return lay
        b = cur.valid.shape[0]
        n_old, n_new = cur.n_vis, k + m
        t_new = t_old - n_old + n_new
        j = torch.arange(t_new, device=device).view(1, -1).expand(b, -1)
        vs = cur.vis_start.view(-1, 1)
        in_vis = (j >= vs) & (j < vs + n_new)
        base_src = torch.where(j < vs, j, torch.where(in_vis, vs, j - n_new + n_old))
        vis_pos = vs + torch.arange(k, device=device).view(1, -1)
        lay = {"t_new": t_new, "base_src": base_src, "vis_pos": vis_pos, "vs": vs}
        if m:
            lay["extra_pos"] = (vs + k + torch.arange(m, device=device).view(1, -1)).unsqueeze(-1)
        valid = cur.valid.gather(1, base_src) | in_vis
        lay["valid"] = valid
        lay["mask"] = None if self.mask_none else _mask4d(valid, t_new, self.impl, dtype)
        if st.renumber and cur.pos_static:
            lay["pos"] = self._renumbered(cur, base_src, j, vs, in_vis, n_old, n_new)
        lay["seqstatic"] = {}
        self.static[key] = lay
        return lay

    @staticmethod
    def _renumbered(cur: _Seq, base_src, j, vs, in_vis, n_old: int, n_new: int) -> torch.Tensor:
        pos_old = cur.pos.gather(1, base_src)
        first = cur.pos.gather(1, vs)
        return torch.where(j < vs, pos_old, torch.where(in_vis, first + (j - vs), pos_old - (n_old - n_new)))

    def _prune(self, i: int, st, layer: int, h: torch.Tensor, more: bool) -> torch.Tensor:
        cur = self.seqs[-1]
        view = _View(self, cur, h, layer)
        out = self.method.prune(i, st, view)
        keep = out.keep
        b, k = keep.shape
        m = 0 if out.extra is None else out.extra.shape[1]
        t_old, d = h.shape[1], h.shape[-1]
        lay = self._layout(i, st, cur, t_old, k, m, h.dtype, h.device)
        src = lay["base_src"].scatter(1, lay["vis_pos"], lay["vs"] + keep)
        src3 = src.unsqueeze(-1)
        h_new = h.gather(1, src3.expand(-1, -1, d))
        if m:
            h_new.scatter_(1, lay["extra_pos"].expand(-1, -1, d), out.extra.to(h_new.dtype))
        if st.renumber:
            pos = lay.get("pos")
            if pos is None:  # after a stage that kept original ids: positions depend on the kept tokens
                j = torch.arange(lay["t_new"], device=h.device).view(1, -1).expand(b, -1)
                vs = lay["vs"]
                pos = self._renumbered(cur, lay["base_src"], j, vs, (j >= vs) & (j < vs + k + m), cur.n_vis, k + m)
                pe = self.lm.rotary_emb(h_new, pos)
            else:
                pe = lay.get("pe")
                if pe is None:
                    pe = lay["pe"] = self.lm.rotary_emb(h_new, pos)
            shift = cur.shift + (cur.n_vis - k - m)
            pos_static = "pos" in lay
        else:
            # original ids, 1-D (B, T) or M-RoPE's 3-D (3, B, T): each kept token keeps its own
            pos = cur.pos.gather(1, src) if cur.pos.dim() == 2 else _expand_b(cur.pos.transpose(0, 1), b).gather(
                2, src.unsqueeze(1).expand(-1, cur.pos.shape[0], -1)).transpose(0, 1)
            shift = cur.shift
            pe = tuple(_expand_b(x, b).gather(1, src3.expand(-1, -1, x.shape[-1])) for x in cur.pe)
            pos_static = False
        new = _Seq(valid=lay["valid"], pos=pos, vis_start=cur.vis_start, n_vis=k + m, shift=shift, layer=layer,
                   static=lay["seqstatic"], pos_static=pos_static, mask=lay["mask"], pe=pe)
        self.keeps.append((keep, out.extra))
        self.seqs.append(new)
        if more:  # another stage at this boundary: carry captured tensors over to the new sequence
            for cap in self.captures.values():
                for key in ("q", "k"):
                    if key in cap:
                        cap[key] = cap[key].gather(1, src3.expand(-1, -1, cap[key].shape[-1]))
                for key in ("q_rot", "k_rot"):  # (B, H, T, d): tokens on dim 2
                    if key in cap:
                        x = cap[key]
                        cap[key] = x.gather(2, src.view(b, 1, -1, 1).expand(-1, x.shape[1], -1, x.shape[-1]))
                cap["seq"] = -1  # the cache no longer matches this sequence
                if cap.get("pe") is not None:
                    cap["pe"] = tuple(_expand_b(x, b).gather(1, src3.expand(-1, -1, x.shape[-1])) for x in cap["pe"])
        return h_new

    def records(self) -> list[dict]:
        """``llm_stages`` of the last prefill: kept indices into the original ``N`` visual tokens per stage."""
        out, orig = [], None
        for s, (keep, extra) in zip(self.seqs[1:], self.keeps):
            b = keep.shape[0]
            base = torch.arange(self.n0, device=keep.device).expand(b, -1) if orig is None else orig
            orig = base.gather(1, keep)
            if extra is not None:
                orig = torch.cat([orig, orig.new_full((b, extra.shape[1]), -1)], dim=1)
            rec = {"layer": s.layer, "n_keep": s.n_vis, "kept_index": orig.detach().cpu(), "kept_rel": keep.detach().cpu()}
            if extra is not None:
                rec["merged"] = extra.detach().cpu()
            out.append(rec)
        return out


class _View:
    """:class:`methods.inllm.StageView` over the runner's current sequence."""

    def __init__(self, runner: _Runner, seq: _Seq, h: torch.Tensor, layer: int):
        self._r, self._s = runner, seq
        self.hidden = h
        self.valid = seq.valid
        self.vis_start = seq.vis_start
        self.n_vis = seq.n_vis
        self.layer = layer
        self.state = runner.state
        self.static = runner.method_static
        self.uniform_start = runner.uniform_start
        self.vis_start_min = runner.vis_start_min
        self.no_padding = runner.mask_none
        self._x = None

    @property
    def sample_seeds(self) -> torch.Tensor:
        seeds = self._r.prepared.extras.get("sample_seeds")
        return seeds if seeds is not None else torch.zeros(self.hidden.shape[0], dtype=torch.long)

    def _attn_module(self, layer: int):
        return self._r.lm.layers[layer].self_attn

    def _norm_input(self, layer: int) -> torch.Tensor:
        if layer != self.layer:
            raise IncompatibleMethodError(f"attention of layer {layer} is not available at the pruning boundary {self.layer}")
        if self._x is None:
            self._x = rms_norm(self._r.lm.layers[layer].input_layernorm, self.hidden, exact=False, llama=self._r.llama_norm)
        return self._x

    def rope(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``(B or 1, T, d)`` that ``layer`` uses on the current sequence."""
        cap = self._captured(layer)
        if cap is not None and ("k_rot" in cap or "k" in cap):
            return cap.get("pe") or self._s.pe
        self._norm_input(layer)
        return self._s.pe if self._s.pe is not None else self._r.lm.rotary_emb(self.hidden, self._s.pos)

    def rope_table(self, layer: int) -> torch.Tensor:
        """:func:`rope_table` of :meth:`rope`; built once per context when the tables are the sequence's
        own and depend on its layout only (the original sequence, renumbered stages)."""
        cos, sin = self.rope(layer)
        own = self._s.pos_static and self._s.pe is not None and cos is self._s.pe[0]
        hit = self._s.static.get("rope_table") if own else None
        if hit is None or hit.shape[:-3] != cos.shape[:-1]:
            hit = rope_table(cos, sin)
            if own:
                self._s.static["rope_table"] = hit
        return hit

    def _captured(self, layer: int) -> dict | None:
        """What the attention tap / projection hooks of ``layer`` (``self.layer - 1``) captured, if anything."""
        cap = self._r.captures.get(layer)
        return cap if layer == self.layer - 1 and cap is not None else None

    def keys(self, layer: int, heads_first: bool = True) -> torch.Tensor:
        """Post-RoPE keys of ``layer`` (``self.layer - 1`` or ``self.layer``) on the current sequence:
        ``(B, H_kv, T, d)``, or ``(B, T, H_kv, d)`` with ``heads_first=False``."""
        cap = self._captured(layer)
        if cap is not None and "k_rot" in cap:  # exactly what the layer computed and attended with
            k = cap["k_rot"]
            return k if heads_first else k.transpose(1, 2)
        if cap is not None and "k" in cap:
            cache = self._r.cache
            if cap.get("seq") == len(self._r.seqs) and cache is not None:
                layers = getattr(cache, "layers", None)
                kc = getattr(layers[layer], "keys", None) if layers is not None and layer < len(layers) else None
                if kc is not None and kc.shape[-2] == self.hidden.shape[1]:
                    return kc if heads_first else kc.transpose(1, 2)  # exactly what the layer computed and attended with
            k = cap["k"]
        else:
            k = self._attn_module(layer).k_proj(self._norm_input(layer))
        b, t = k.shape[:2]
        return apply_rope(k.view(b, t, -1, self._attn_module(layer).head_dim), self.rope_table(layer), heads_first)

    def values(self, layer: int) -> torch.Tensor:
        """Values ``(B, T, H_kv, d)`` of ``layer`` (``self.layer - 1``, captured when the method sets
        ``capture_values``, or ``self.layer``) on the current sequence."""
        cap = self._captured(layer)
        attn = self._attn_module(layer)
        v = cap["v"] if cap is not None and "v" in cap else attn.v_proj(self._norm_input(layer))
        b, t = v.shape[:2]
        return v.view(b, t, -1, attn.head_dim)

    def query_rows(self, layer: int, queries: str = "last") -> torch.Tensor:
        """Post-RoPE queries ``(B, H, Q, d)`` of ``layer`` for the query set ``queries`` (see :meth:`attn_rows`)."""
        q_index, _ = self.query_index(queries)
        nq = q_index.shape[0]
        off = self._r.query_offset if queries == "last" else 0
        return self._q_rows(layer, self.hidden.shape[1] - nq - off)[:, :, :nq]

    def _q_rows(self, layer: int, first: int) -> torch.Tensor:
        """Post-RoPE queries ``(B, H, T - first, d)`` of ``layer`` for the rows ``first:``."""
        attn = self._attn_module(layer)
        cap = self._captured(layer)
        if cap is not None and "q_rot" in cap:
            return cap["q_rot"][:, :, first:]
        if cap is not None and "q" in cap:
            q = cap["q"][:, first:]
        else:
            q = attn.q_proj(self._norm_input(layer)[:, first:])
        b, nq = q.shape[:2]
        return apply_rope(q.view(b, nq, -1, attn.head_dim), self.rope_table(layer)[:, first:])

    def _qk_one_rotation(self, layer: int, first: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Post-RoPE query rows ``first:`` and keys of ``layer`` scored on its input (nothing captured), with
        one rotation for both: ``(B, H, T - first, d)``, ``(B, H, T, d)``; ``None`` where it does not apply.

        Batch 1 on CUDA, plain bias-free ``nn.Linear`` projections of equal width (no GQA), no hooks: the
        two projections are the very ``mm`` calls ``F.linear`` makes (same operands, shapes and leading
        dimensions), written into the rows ``[0, T)`` and ``[T, T + Q)`` of one buffer, which
        :func:`apply_rope` rotates with the table extended by the query rows' own factors: elementwise,
        so every value is the one the two separate rotations give, in two kernels instead of four.
        """
        if self._captured(layer) is not None:
            return None
        x = self._norm_input(layer)
        attn = self._attn_module(layer)
        qp, kp = attn.q_proj, attn.k_proj
        b, t, dm = x.shape
        if (b != 1 or not x.is_cuda or not x.is_contiguous() or first >= t
                or any(type(p) is not torch.nn.Linear or p.bias is not None or p._forward_hooks or p._forward_pre_hooks
                       or p.weight.dtype != x.dtype for p in (qp, kp))
                or qp.weight.shape != kp.weight.shape):
            return None
        table = self.rope_table(layer)
        key = ("rope_table_qk", first)
        hit = self._s.static.get(key)
        if hit is not None and hit[0] is table:  # layout-only, cached with the table it extends
            ext = hit[1]
        else:
            ext = torch.cat([table, table[:, first:]], dim=1)
            if self._s.static.get("rope_table") is table:
                self._s.static[key] = (table, ext)
        x2 = x.view(t, dm)
        buf = x.new_empty(2 * t - first, kp.weight.shape[0])
        torch.mm(x2, kp.weight.t(), out=buf[:t])
        torch.mm(x2[first:], qp.weight.t(), out=buf[t:])
        rot = apply_rope(buf.view(1, 2 * t - first, -1, attn.head_dim), ext)  # (1, H, T + Q, d)
        return rot[:, :, t:], rot[:, :, :t]

    def query_index(self, queries: str) -> tuple[torch.Tensor, torch.Tensor]:
        st = self._s.static
        hit = st.get(("q", queries))
        if hit is not None:
            return hit
        t = self.hidden.shape[1]
        dev = self.hidden.device
        off = self._r.query_offset
        if queries == "last":  # ``query_offset``: the row that many tokens before the last (an adapter's port says)
            q_index = torch.arange(t - 1 - off, t - off, device=dev)
        elif queries == "after_image":
            first = self._r.vis_start_min + self.n_vis
            q_index = torch.arange(first, t, device=dev)
        else:
            raise ValueError(f"unknown query set {queries!r}")
        q_valid = q_index.view(1, -1) >= (self.vis_start + self.n_vis).view(-1, 1)
        st[("q", queries)] = (q_index, q_valid)
        # the last row of an unpadded sequence sees every key: no mask at all
        allowed = None if (queries == "last" and self.no_padding and not off) else _rows_allowed(q_index, None if self.no_padding else self.valid, t)
        st[("allowed", queries)] = allowed
        st[("bias", queries)] = None if allowed is None else _bias(allowed, self.hidden.dtype)
        return q_index, q_valid

    def attn_rows(self, layer: int, queries: str = "last", rope: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        q_index, q_valid = self.query_index(queries)
        nq = q_index.shape[0]
        off = self._r.query_offset if queries == "last" else 0
        first = self.hidden.shape[1] - nq - off  # both query sets are a suffix of the sequence (but ``off`` rows)
        attn = self._attn_module(layer)
        if not rope:  # scores from the un-rotated projections of the layer's input (VScan's Qwen2.5-VL port)
            x = self._norm_input(layer)
            b, t = x.shape[:2]
            q = attn.q_proj(x[:, first:]).view(b, t - first, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
        else:
            qk = self._qk_one_rotation(layer, first) if FUSE_QK else None
            q, k = qk if qk is not None else (self._q_rows(layer, first), self.keys(layer))
        if off:
            q = q[:, :, :nq]
        scaling = getattr(attn, "scaling", attn.head_dim**-0.5)
        return attention_rows(q, k, None, None, scaling, bias=self._s.static[("bias", queries)]), q_valid

    def rows_allowed(self, queries: str) -> torch.Tensor:
        """``(B or 1, 1, Q, T)`` keys visible from the query rows (all True where no mask is needed)."""
        q_index, _ = self.query_index(queries)
        allowed = self._s.static[("allowed", queries)]
        if allowed is None:
            allowed = torch.ones(1, 1, q_index.shape[0], self.hidden.shape[1], dtype=torch.bool, device=self.hidden.device)
        return allowed

    def visual(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The current visual block of ``x`` along ``dim`` (1: tokens ``(B, T, ...)``; -1: attention columns)."""
        n = self.n_vis
        if self.uniform_start:
            return x.narrow(dim, self._r.vis_start_min, n)
        if dim == 1:
            from methods.inllm import visual_block

            return visual_block(x, self.vis_start, n)
        from methods.inllm import visual_columns

        return visual_columns(x, self.vis_start, n)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(self._r.lm.norm, h, llama=self._r.llama_norm)

    def input_embeds(self) -> torch.Tensor:
        return self._r.prepared.inputs_embeds

    def sublayer_io(self) -> Any:
        return self._r.captures.get("sublayers")


# ----------------------------------------------------------------------------------- entry point
@contextlib.contextmanager
def prune_in_llm(adapter, method, prepared):
    """Apply the ``in_llm`` ``method`` to every forward/``generate`` of ``adapter.model`` inside the block.

    Parameters
    ----------
    adapter : bench.models.llava.LlavaAdapter
        Loaded adapter (``adapter.model`` is a ``LlavaForConditionalGeneration`` with a Llama LM).
    method : methods.inllm.InLLMMethod
    prepared : bench.models.base.PreparedBatch
        From ``adapter.prepare`` (every visual token kept); ``extras["image_spans"]`` locates the
        image in each sample. ``extras["visual_tokens_per_layer"]`` and ``extras["llm_stages"]`` are
        written on the first prefill.
    """
    model = adapter.model
    lm = adapter.language_model
    layers = adapter.decoder_layers
    n_layers = len(layers)
    impl = getattr(lm.config, "_attn_implementation", None) or "sdpa"
    if impl not in ("sdpa", "eager"):
        raise IncompatibleMethodError(f"in-LLM pruning supports sdpa and eager attention, not {impl!r}")
    # ``llm_spans``: where an adapter's port says the method's visual block is, when it is not the whole image
    # (VScan's official LLaVA-NeXT code: the block's first tokens only)
    spans = prepared.extras.get("llm_spans", prepared.extras["image_spans"])
    widths = (spans[:, 1] - spans[:, 0]).unique()
    if len(widths) != 1:
        raise IncompatibleMethodError("in-LLM pruning needs the same number of visual tokens in every sample")
    n0 = int(widths[0])
    if getattr(method, "pre_llm_selection", False):  # VScan: the stages follow a selection before the LLM
        plan = list(method.plan_for(int(prepared.extras.get("llm_plan_tokens", prepared.visual_tokens_in[0])), n0, n_layers))
    else:
        plan = list(method.plan(n0, n_layers))
    b = prepared.input_ids.shape[0]
    counts = [n0] * n_layers
    for st in sorted(plan, key=lambda s: s.layer):
        for layer in range(st.layer, n_layers):
            counts[layer] = st.n_keep
    prepared.extras["visual_tokens_per_layer"] = torch.tensor(counts, dtype=torch.long).expand(b, n_layers).clone()
    prepared.extras["visual_tokens_layer_mean"] = sum(counts) / n_layers
    if not plan:
        prepared.extras["llm_stages"] = []
        yield None
        return
    stage_of_layer = [sum(1 for s in plan if s.layer <= layer) for layer in range(n_layers)]
    stages_at: dict[int, list[int]] = {}
    for i, s in enumerate(plan):
        stages_at.setdefault(s.layer, []).append(i)
    capture = frozenset(s.layer + off for s in plan for off in getattr(method, "capture_offsets", ()) if 0 <= s.layer + off < n_layers)
    runner = _Runner(adapter, method, prepared, plan, impl, n0, capture_layers=capture, stage_of_layer=stage_of_layer,
                     stages_at=stages_at)
    device = prepared.inputs_embeds.device
    runner.spans_dev = spans.to(device)
    runner.query_offset = int(prepared.extras.get("llm_query_offset", 0))
    runner.vis_start_min = int(spans[:, 0].min())
    runner.uniform_start = bool((spans[:, 0] == spans[0, 0]).all())
    setup = getattr(method, "runtime_setup", None)
    if setup is not None:
        runner.method_static = setup(plan, prepared, device) or {}
    handles = [lm.register_forward_pre_hook(runner.lm_pre, with_kwargs=True)]
    gen_cfg = getattr(model, "generation_config", None)
    old_use_cache = getattr(gen_cfg, "use_cache", None)
    first = min(s.layer for s in plan)
    undo_tap = None
    try:
        for layer in range(first, n_layers):  # layers before the first stage never change
            handles.append(layers[layer].register_forward_pre_hook(partial(runner.layer_pre, layer), with_kwargs=True))
        for layer in capture:
            attn = layers[layer].self_attn
            handles.append(attn.q_proj.register_forward_hook(partial(runner.capture_out, layer, "q")))
            handles.append(attn.k_proj.register_forward_hook(partial(runner.capture_out, layer, "k")))
            if getattr(method, "capture_values", False):  # FlowCut's Qwen port scores with the layer's values too
                handles.append(attn.v_proj.register_forward_hook(partial(runner.capture_out, layer, "v")))
        if capture and impl == "sdpa":
            undo_tap = _tap_attention({layers[layer].self_attn: partial(runner.capture_rot, layer) for layer in capture})
        extra_hooks = getattr(method, "install_hooks", None)
        if extra_hooks is not None:
            handles.extend(extra_hooks(lm, runner))
        if getattr(method, "reprune_every_step", False) and gen_cfg is not None:
            gen_cfg.use_cache = False  # FastV's in-place mode: no cache, every step prunes again
        yield runner
    finally:
        for hd in handles:
            hd.remove()
        if undo_tap is not None:
            undo_tap()
        if gen_cfg is not None and getattr(method, "reprune_every_step", False):
            gen_cfg.use_cache = old_use_cache
        runner.captures = {}
        runner.cache = None
        if runner.seqs and len(runner.seqs) > 1 and not runner.capturing:  # a captured forward computed nothing
            prepared.extras["llm_stages"] = runner.records()
        # runner.static stays: a CUDA graph captured inside the context replays kernels that read it
