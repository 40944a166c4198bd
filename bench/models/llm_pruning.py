"""Pruning inside the LLM: forward pre-hooks on the decoder layers of a transformers Llama LM.

:func:`prune_in_llm` applies an ``in_llm`` method (``methods/inllm.py``) to a LLaVA model without
touching transformers' modeling code. It installs

* a forward pre-hook (with kwargs) on the language model (``LlamaModel``) that reads each call's 2-D
  attention mask, position ids and KV-cache length, to tell prefill from decoding;
* a forward pre-hook (with kwargs) on every decoder layer. At a pruning layer during prefill it asks
  the method for the kept indices and gathers the hidden states; from the first pruning layer on it
  replaces the layer's ``attention_mask`` (a 4-D mask over the pruned sequence), ``position_ids`` and
  ``position_embeddings`` (original ids, or renumbered, as the method's stage says);
* forward hooks on ``q_proj``/``k_proj`` of the layers whose attention a method scores on their own
  input (FastV's layer K-1, DART's keys, SparseVLM's scoring layers), so attention rows are recomputed
  from tensors the layer already produced: ``softmax(q_rows . K^T / sqrt(d) + causal/padding mask)``
  under SDPA, never by switching the model to eager attention;
* whatever extra hooks a method installs (TransPrune's sublayer input/output hooks), routed through
  :meth:`_Runner.sub_hook` so they are timed with the rest.

Cost model (batch-1 prefill is CPU-launch-bound): decoder layers before the first pruning layer get no
hook at all; the hooks never synchronise with the device (no ``.item()``, ``.tolist()``, ``nonzero``
or boolean indexing); index tensors that depend only on the layout (sources of the non-visual tokens,
masks, renumbered positions and their rotary tables, query rows, causal masks of the scored rows) are
built once per stage and sequence length and reused by every later call inside the context (decoding
steps, re-pruning); with original position ids, the rotary tables of the pruned sequence are gathered
from the previous ones instead of recomputed.

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

__all__ = ["prune_in_llm", "attention_rows", "apply_rope"]


# ----------------------------------------------------------------------------------- pure helpers
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` ``(B, H, T, d)`` with ``cos``/``sin`` ``(B, T, d)`` (Llama's convention)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def attention_rows(
    q: torch.Tensor, k: torch.Tensor, q_index: torch.Tensor, key_valid: torch.Tensor, scaling: float,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention probabilities for a few query rows.

    Parameters
    ----------
    q : torch.Tensor
        ``(B, H, Q, d)`` post-RoPE queries of the rows.
    k : torch.Tensor
        ``(B, H_kv, T, d)`` post-RoPE keys of the whole sequence (``H % H_kv == 0``).
    q_index : torch.LongTensor
        ``(Q,)`` sequence positions of the query rows (causality: key ``j`` is visible iff ``j <= q_index``).
    key_valid : torch.BoolTensor
        ``(B, T)``; padding keys are masked.
    scaling : float
        ``1/sqrt(d)``.
    allowed : torch.BoolTensor, optional
        ``(B or 1, 1, Q, T)`` precomputed ``causal & key_valid`` (then ``q_index``/``key_valid`` are unused).

    Returns
    -------
    torch.Tensor
        ``(B, H, Q, T)`` probabilities, softmax in fp32 then cast to ``q.dtype`` as eager attention does.
    """
    h, hkv = q.shape[1], k.shape[1]
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if allowed is None:
        allowed = _rows_allowed(q_index, key_valid)
    logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)


def _rows_allowed(q_index: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """``(B, 1, Q, T)``: key ``j`` visible from row ``q_index[r]`` (causal) and not padding."""
    t = key_valid.shape[1]
    allowed = (torch.arange(t, device=key_valid.device).view(1, t) <= q_index.view(-1, 1)).view(1, 1, -1, t)
    return allowed & key_valid.view(key_valid.shape[0], 1, 1, t)


def _mask4d(valid: torch.Tensor, q_len: int, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """4-D mask for the last ``q_len`` queries over keys ``valid`` ``(B, T)``: causal + padding.

    Fully masked rows (queries on left padding) attend to themselves so no row is all -inf.
    """
    b, t = valid.shape
    qi = torch.arange(t - q_len, t, device=valid.device).view(q_len, 1)
    kj = torch.arange(t, device=valid.device).view(1, t)
    allowed = ((kj <= qi).view(1, q_len, t) & valid.view(b, 1, t)) | (kj == qi).view(1, q_len, t)
    allowed = allowed.unsqueeze(1)
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(~allowed, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------- runtime state
@dataclass
class _Seq:
    """The token sequence seen by the layers of one stage (prefill layout)."""

    valid: torch.Tensor  # (B, T) bool
    pos: torch.Tensor  # (B, T) position ids used by the layers
    vis_start: torch.Tensor  # (B,)
    n_vis: int
    orig_map: torch.Tensor  # (B, n_vis) index into the original N visual tokens, -1 merged
    shift: int = 0  # decode positions = original ids - shift
    layer: int = 0
    static: dict = field(default_factory=dict)  # layout-only tensors of this sequence (query rows, ...)
    # per-call decode state
    dec_valid: torch.Tensor | None = None
    call_id: int = -1
    mask: Any = None
    pe: Any = None
    pos_call: torch.Tensor | None = None


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
    captures: dict = field(default_factory=dict)  # layer -> {"q": , "k": , "pe": }
    capture_layers: frozenset = frozenset()
    seqs: list = field(default_factory=list)  # _Seq per executed stage
    stage_of_layer: list = field(default_factory=list)
    stages_at: dict = field(default_factory=dict)  # layer -> [stage index, ...]
    prefill: bool = True
    call_id: int = 0
    call_valid: torch.Tensor | None = None
    call_pos: torch.Tensor | None = None
    q_len: int = 0
    spans_dev: torch.Tensor | None = None  # image spans on the model device (copied once, outside the forward)
    vis_start_min: int = 0  # host copies: no device->host sync when choosing rows and slices
    uniform_start: bool = False  # every sample's image starts at the same position (slices instead of gathers)
    static: dict = field(default_factory=dict)  # (stage, T) -> layout-only index tensors, kept for the whole context
    method_static: dict = field(default_factory=dict)  # from method.runtime_setup (seeded noise, ...)
    state: dict = field(default_factory=dict)  # per-prefill method state (raters, accumulated scores)

    @property
    def lm(self):
        return self.adapter.model.model.language_model

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
        cache = kwargs.get("past_key_values")
        past = int(cache.get_seq_length()) if cache is not None else 0
        mask2d = kwargs.get("attention_mask")
        if mask2d is None or mask2d.dim() != 2:
            if mask2d is not None:
                raise IncompatibleMethodError("in-LLM pruning needs a 2-D attention mask (or none) at the LLM input")
            mask2d = torch.ones(b, past + q, dtype=torch.bool, device=device)
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = (torch.arange(past, past + q, device=device)).view(1, q).expand(b, q)
        self.call_id += 1
        self.prefill = past == 0
        self.call_valid = mask2d if mask2d.dtype == torch.bool else mask2d.bool()
        self.call_pos = pos.expand(b, q) if pos.dim() == 2 else pos
        self.q_len = q
        if self.prefill:
            n = self.n0
            key = ("seq0", b, q)
            orig = self.static.get(key)
            if orig is None:
                orig = self.static[key] = torch.arange(n, device=device).expand(b, n)
            self.seqs = [_Seq(valid=self.call_valid[:, -q:], pos=self.call_pos, vis_start=self.spans_dev[:, 0],
                              n_vis=n, orig_map=orig, layer=0, static=self.static.setdefault(("seqstatic", 0, q), {}))]
            self.captures = {}
            self.state = {"record_extra": {}}
        return None

    def layer_pre(self, layer: int, module, args, kwargs):
        if self.prefill:
            stages = self.stages_at.get(layer)
            if stages:
                from_args = len(args) > 0
                h = args[0] if from_args else kwargs["hidden_states"]
                cur = self.seqs[-1]
                if cur.pe is None:  # the original sequence: the model's own rotary tables and mask
                    cur.pe = kwargs.get("position_embeddings")
                    cur.mask = kwargs.get("attention_mask")
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
                kwargs["position_ids"] = cur.pos
            return args, kwargs
        cur = self._decode_seq(layer, args[0] if args else kwargs["hidden_states"])
        if cur is not None:
            kwargs["attention_mask"] = cur.mask
            kwargs["position_embeddings"] = cur.pe
            kwargs["position_ids"] = cur.pos_call
        return args, kwargs

    def capture_out(self, layer: int, name: str, module, inputs, output):
        if self.prefill:
            self.captures.setdefault(layer, {})[name] = output

    def sub_hook(self, fn, *args, **kwargs):
        """Method-installed hooks run through here (so the overhead script times them too)."""
        return fn(self, *args, **kwargs)

    # ------------------------------------------------------------------ decoding
    def _decode_seq(self, layer: int, h: torch.Tensor):
        """The stage state for ``layer`` during a decoding call (mask over its own cache)."""
        idx = self.stage_of_layer[layer] if layer < len(self.stage_of_layer) else 0
        if idx <= 0 or idx >= len(self.seqs):
            return None
        cur = self.seqs[idx]
        if cur.call_id != self.call_id:
            q = self.q_len
            prev = cur.dec_valid if cur.dec_valid is not None else cur.valid
            cur.dec_valid = torch.cat([prev, self.call_valid[:, -q:]], dim=1)
            cur.mask = _mask4d(cur.dec_valid, q, self.impl, h.dtype)
            cur.pos_call = self.call_pos - cur.shift if cur.shift else self.call_pos
            cur.pe = self.lm.rotary_emb(h, cur.pos_call)
            cur.call_id = self.call_id
        return cur

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
        lay["mask"] = _mask4d(valid, t_new, self.impl, dtype)
        if st.renumber:
            pos_old = cur.pos.gather(1, base_src)
            first = cur.pos.gather(1, vs)
            lay["pos"] = torch.where(j < vs, pos_old, torch.where(in_vis, first + (j - vs), pos_old - (n_old - n_new)))
        lay["seqstatic"] = {}
        self.static[key] = lay
        return lay

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
            pos = lay["pos"]
            shift = cur.shift + (cur.n_vis - k - m)
            pe = lay.get("pe")
            if pe is None:
                pe = lay["pe"] = self.lm.rotary_emb(h_new, pos)
        else:
            pos = cur.pos.gather(1, src)
            shift = cur.shift
            pe = tuple(_expand_b(x, b).gather(1, src3.expand(-1, -1, x.shape[-1])) for x in cur.pe)
        orig = cur.orig_map.gather(1, keep)
        if m:
            orig = torch.cat([orig, orig.new_full((b, m), -1)], dim=1)
        new = _Seq(valid=lay["valid"], pos=pos, vis_start=cur.vis_start, n_vis=k + m, orig_map=orig, shift=shift,
                   layer=layer, static=lay["seqstatic"], mask=lay["mask"], pe=pe)
        rec = self.state.get("record_extra")
        if rec is not None:
            rec[len(self.seqs)] = (keep, out.extra)
        self.seqs.append(new)
        if more:  # another stage at this boundary: carry captured tensors over to the new sequence
            for cap in self.captures.values():
                for key in ("q", "k"):
                    if key in cap:
                        cap[key] = cap[key].gather(1, src3.expand(-1, -1, cap[key].shape[-1]))
                if cap.get("pe") is not None:
                    cap["pe"] = tuple(_expand_b(x, b).gather(1, src3.expand(-1, -1, x.shape[-1])) for x in cap["pe"])
        return h_new


class _View:
    """:class:`methods.inllm.StageView` over the runner's current sequence."""

    def __init__(self, runner: _Runner, seq: _Seq, h: torch.Tensor, layer: int):
        self._r, self._s = runner, seq
        self.hidden = h
        self.valid = seq.valid
        self.vis_start = seq.vis_start
        self.n_vis = seq.n_vis
        self.layer = layer
        self.sample_seeds = runner.prepared.extras.get("sample_seeds", torch.zeros(h.shape[0], dtype=torch.long))
        self.orig_map = seq.orig_map
        self.state = runner.state
        self.static = runner.method_static
        self.uniform_start = runner.uniform_start
        self.vis_start_min = runner.vis_start_min
        self._x = None

    def _attn_module(self, layer: int):
        return self._r.lm.layers[layer].self_attn

    def _qk(self, layer: int):
        """Pre-RoPE ``q (B, T, H*d)``, ``k (B, T, H_kv*d)`` and ``(cos, sin)`` of ``layer`` on the current sequence."""
        cap = self._r.captures.get(layer)
        if layer == self.layer - 1 and cap is not None and "k" in cap:
            pe = cap.get("pe") or self._s.pe
            return cap.get("q"), cap["k"], pe, None
        if layer != self.layer:
            raise IncompatibleMethodError(f"attention of layer {layer} is not available at the pruning boundary {self.layer}")
        dec = self._r.lm.layers[layer]
        x = self._x
        if x is None:
            x = self._x = dec.input_layernorm(self.hidden)
        pe = self._s.pe if self._s.pe is not None else self._r.lm.rotary_emb(self.hidden, self._s.pos)
        return None, dec.self_attn.k_proj(x), pe, x

    def keys(self, layer: int) -> torch.Tensor:
        _, k, (cos, sin), _ = self._qk(layer)
        attn = self._attn_module(layer)
        d = attn.head_dim
        b, t = k.shape[:2]
        return apply_rope(k.view(b, t, -1, d).transpose(1, 2), cos, sin)

    def query_index(self, queries: str) -> tuple[torch.Tensor, torch.Tensor]:
        st = self._s.static
        hit = st.get(("q", queries))
        if hit is not None:
            return hit
        t = self.hidden.shape[1]
        dev = self.hidden.device
        if queries == "last":
            q_index = torch.arange(t - 1, t, device=dev)
        elif queries == "after_image":
            first = self._r.vis_start_min + self.n_vis
            q_index = torch.arange(first, t, device=dev)
        else:
            raise ValueError(f"unknown query set {queries!r}")
        q_valid = q_index.view(1, -1) >= (self.vis_start + self.n_vis).view(-1, 1)
        st[("q", queries)] = (q_index, q_valid)
        st[("allowed", queries)] = _rows_allowed(q_index, self.valid)
        return q_index, q_valid

    def attn_rows(self, layer: int, queries: str = "last") -> tuple[torch.Tensor, torch.Tensor]:
        q_full, k, (cos, sin), x = self._qk(layer)
        attn = self._attn_module(layer)
        d = attn.head_dim
        b, t = k.shape[:2]
        q_index, q_valid = self.query_index(queries)
        allowed = self._s.static[("allowed", queries)]
        nq = q_index.shape[0]
        first = t - nq  # both query sets are a suffix of the sequence: slices, not gathers
        if q_full is None:
            q = attn.q_proj(x[:, first:])
        else:
            q = q_full[:, first:]
        q = q.view(b, nq, -1, d).transpose(1, 2)
        cos, sin = _expand_b(cos, b), _expand_b(sin, b)
        q = apply_rope(q, cos[:, first:], sin[:, first:])
        kk = apply_rope(k.view(b, t, -1, d).transpose(1, 2), cos, sin)
        scaling = getattr(attn, "scaling", d**-0.5)
        return attention_rows(q, kk, q_index, self.valid, scaling, allowed=allowed), q_valid

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
        return self._r.lm.norm(h)

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
    lm = model.model.language_model
    layers = lm.layers
    n_layers = len(layers)
    impl = getattr(lm.config, "_attn_implementation", None) or "sdpa"
    if impl not in ("sdpa", "eager"):
        raise IncompatibleMethodError(f"in-LLM pruning supports sdpa and eager attention, not {impl!r}")
    spans = prepared.extras["image_spans"]
    widths = (spans[:, 1] - spans[:, 0]).unique()
    if len(widths) != 1:
        raise IncompatibleMethodError("in-LLM pruning needs the same number of visual tokens in every sample")
    n0 = int(widths[0])
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
    runner.vis_start_min = int(spans[:, 0].min())
    runner.uniform_start = bool((spans[:, 0] == spans[0, 0]).all())
    setup = getattr(method, "runtime_setup", None)
    if setup is not None:
        runner.method_static = setup(plan, prepared, device) or {}
    handles = [lm.register_forward_pre_hook(runner.lm_pre, with_kwargs=True)]
    gen_cfg = getattr(model, "generation_config", None)
    old_use_cache = getattr(gen_cfg, "use_cache", None)
    first = min(s.layer for s in plan)
    try:
        for layer in range(first, n_layers):  # layers before the first stage never change
            handles.append(layers[layer].register_forward_pre_hook(partial(runner.layer_pre, layer), with_kwargs=True))
        for layer in capture:
            attn = layers[layer].self_attn
            handles.append(attn.q_proj.register_forward_hook(partial(runner.capture_out, layer, "q")))
            handles.append(attn.k_proj.register_forward_hook(partial(runner.capture_out, layer, "k")))
        extra_hooks = getattr(method, "install_hooks", None)
        if extra_hooks is not None:
            handles.extend(extra_hooks(lm, runner))
        if getattr(method, "reprune_every_step", False) and gen_cfg is not None:
            gen_cfg.use_cache = False  # FastV's in-place mode: no cache, every step prunes again
        yield runner
    finally:
        for hd in handles:
            hd.remove()
        if gen_cfg is not None and getattr(method, "reprune_every_step", False):
            gen_cfg.use_cache = old_use_cache
        runner.captures = {}
        if runner.seqs and len(runner.seqs) > 1:
            extras = (runner.state or {}).get("record_extra") or {}
            prepared.extras["llm_stages"] = [
                {"layer": s.layer, "n_keep": s.n_vis, "kept_index": s.orig_map.detach().cpu(),
                 **({"kept_rel": extras[j][0].detach().cpu()} if j in extras else {}),
                 **({"merged": extras[j][1].detach().cpu()} if j in extras and extras[j][1] is not None else {})}
                for j, s in enumerate(runner.seqs) if j > 0
            ]
        runner.static = {}
