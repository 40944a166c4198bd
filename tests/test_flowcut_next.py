"""FlowCut on LLaVA-NeXT (``port: llava_next``, :mod:`methods.flowcut_ports`), on a tiny random-config model (CPU, float32).

The model is ``tests/test_llava_next.py``'s layout (56 px tiles of 4 x 4 tokens, anyres crops, unpadding, newlines)
with a 7-block CLIP tower (feature layer -2: six blocks run, cuts after blocks 0, 2 and 4) and a 4-layer LLM. The
reference count ``N_ref`` is 5 tiles x 16 = 80; at ratio 0.8 ``target_num = 16``, 8 patches per tile, so a 112 x 112
image sends 40 tokens and LLM layer 1's stage keeps 16 of them from layer 2 on.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_llava_next import EOS, IMG, PAD, SIZES, make_batch, one_sample, seeds
from test_llm_methods import _reference_generate, _reference_logits

from bench.errors import IncompatibleMethodError
from methods.registry import create

RATIO = 0.8
STEPS = 4


def tiny_next_deep(seed: int = 0, attn: str = "sdpa"):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=7, num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32)
    tc = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                     pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
    cfg = LlavaNextConfig(vision_config=vc, text_config=tc, image_token_index=IMG, image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
                          vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg.pad_token_id = PAD
    for c in (cfg, vc, tc):
        c._attn_implementation = attn
    model = LlavaNextForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # attention far from uniform in the tower and the LLM, so the entropy cuts and top-k are not ties
        model.model.image_newline.normal_(generator=g)
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("vision_tower" in name or "language_model" in name or "lm_head" in name or "projector" in name):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]) * 1.5)
    return model


def _adapter(attn: str = "sdpa", budget: str = "tile", device: str = "cpu", dtype: str = "float32"):
    from bench.models.llava_next import LlavaNextAdapter

    a = LlavaNextAdapter(name="tiny_next_deep", source="none", weights="random", device=device, dtype=dtype, budget=budget)
    a.model = tiny_next_deep(attn=attn).to(device, getattr(torch, dtype))
    return a


@pytest.fixture(scope="module")
def adapter():
    return _adapter()


def _flowcut(adapter, ratio=RATIO):
    m = create("flowcut", ratio)
    adapter.check_method(m)
    return m


# ----------------------------------------------------------------------------- references from the official code
def _official_unpad_mask(mask: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """``llava_arch.py::unpad_mask`` (``original_size`` is PIL's ``(width, height)``)."""
    ow, oh = original_size
    ch, cw = mask.shape
    if ow / oh > cw / ch:
        pad = (ch - int(oh * (cw / ow))) // 2
        mask[:pad, :] = False
        mask[ch - pad:, :] = False
    else:
        pad = (cw - int(ow * (ch / oh))) // 2
        mask[:, :pad] = False
        mask[:, cw - pad:] = False
    return mask


@torch.no_grad()
def _official_tower(vm, px: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``CLIPEncoder_forward`` / ``CLIPEncoderLayer_forward`` / ``CLIPAttention_forward`` with FlowCut, the tiles one
    batch, as a plain loop: returns ``hidden_states[-2]`` (``(P, 1 + k, C)``) and ``all_keep_indices`` ``(P, k)``."""
    h = vm.pre_layrnorm(vm.embeddings(px))
    b = h.shape[0]
    keep_all = torch.arange(h.shape[1]).unsqueeze(0).expand(b, -1)
    cum, states = None, []
    select_layer = len(vm.encoder.layers) - 2
    for idx, layer in enumerate(vm.encoder.layers):
        rpl = select_layer - idx - 1
        states.append(h)
        at = layer.self_attn
        x = layer.layer_norm1(h)
        q, k, v = (t.view(b, -1, at.num_heads, at.head_dim).transpose(1, 2) for t in (at.q_proj(x) * at.scale, at.k_proj(x), at.v_proj(x)))
        w = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # (P, H, S, S)
        sem = torch.softmax(v[:, :, :1] @ v.transpose(-1, -2), dim=-1)[:, :, 0].mean(1)  # (P, S)
        h = h + at.out_proj((w @ v).transpose(1, 2).reshape(b, -1, at.num_heads * at.head_dim))
        h = h + layer.mlp(layer.layer_norm2(h))
        if h.shape[1] > target:
            cls_attn = w[:, :, 0, 1:].mean(1)
            value = v.mean(1)[:, 1:]
            score = (cls_attn / cls_attn.sum(-1, keepdim=True) + sem[:, 1:] / sem[:, 1:].sum(-1, keepdim=True)) * value.norm(p=1, dim=-1)
            cum = score.clone() if cum is None else 0.5 * cum + 0.5 * score
            if not rpl % 2:
                if rpl:  # adaptive_prune_ratio, its r.max(0) over the tiles (clamped at 0: the harness's named difference)
                    n = cls_attn.shape[-1]
                    p = cls_attn / cls_attn.sum(-1, keepdim=True)
                    ratio = -(p * torch.log(p)).sum(-1) / torch.log(torch.tensor(n))
                    r = (n - (target - 1)) / rpl**0.5 * (1 - ratio**2)
                    prune = max(int(r.max(0).values.round()), 0)
                else:
                    prune = h.shape[1]
                num = max(h.shape[1] - prune, target)
                keep = torch.topk(cum, num - 1, dim=1).indices.sort(dim=1).values
                cum = cum.gather(1, keep)
                keep_all = keep_all.gather(1, keep)
                h = torch.cat([h[:, :1], h[:, 1:].gather(1, keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]))], dim=1)
    states.append(h)
    return states[-2], keep_all


@torch.no_grad()
def _official_image(adapter, pixels: torch.Tensor, size: torch.Tensor, target_num: int) -> torch.Tensor:
    """``prepare_inputs_labels_for_multimodal_flowcut``'s anyres branch for one image: the base tile's kept rows, then
    ``restore_image_features_sorted`` + ``unpad_mask`` on the crops (no newline)."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
    )

    tiles, side = adapter._num_tiles(size), adapter.grid[1]
    from bench.models.clip_extras import vision_model

    vm = vision_model(adapter.model)
    feat, keep = _official_tower(vm, pixels[:tiles], target_num // 2 + 1)  # target_tokens = int(target_num/2) + 1
    proj = adapter.model.model.multi_modal_projector(feat[:, 1:])
    nph, npw = get_anyres_image_grid_shape(size.tolist(), adapter.config.image_grid_pinpoints, adapter.config.vision_config.image_size)
    crops, d = tiles - 1, proj.shape[-1]
    restored = torch.zeros(crops, side * side, d)
    mask = torch.zeros(crops, side * side, dtype=torch.bool)
    mask.scatter_(1, keep[1:], True)
    restored[mask] = proj[1:].reshape(-1, d)
    grid = restored.view(nph, npw, side, side, d).permute(0, 2, 1, 3, 4).reshape(nph * side, npw * side, d)
    mask = mask.view(nph, npw, side, side).permute(0, 2, 1, 3).reshape(nph * side, npw * side)
    mask = _official_unpad_mask(mask, (int(size[1]), int(size[0])))
    return torch.cat([proj[0], grid[mask]])


def _official_llm_keep(eager, prepared, t: int) -> list[int]:
    """``LlamaSdpaAttention_forward``'s layer-1 stage from an eager forward: the last token's attention over the image
    columns renormalised (the official softmax over those columns only), its value against the image values
    (``v_proj``'s output, key heads repeated), ``compute_score``'s normalised sum times ``|mean_heads v|_1``."""
    lm = eager.model.model.language_model
    got = {}
    hook = lm.layers[1].self_attn.v_proj.register_forward_hook(lambda mod, i, o: got.setdefault("v", o))
    try:
        att = eager.model(inputs_embeds=prepared.inputs_embeds, output_attentions=True).attentions[1][0]  # (H, T, T)
    finally:
        hook.remove()
    s0, s1 = prepared.extras["image_spans"][0].tolist()
    cfg = eager.config.text_config
    hd = cfg.hidden_size // cfg.num_attention_heads
    v = got["v"][0].view(-1, cfg.num_key_value_heads, hd).transpose(0, 1).repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, 0)
    row = att[:, -1, s0:s1]
    rel = (row / row.sum(-1, keepdim=True)).mean(0)
    sem = torch.softmax(v[:, -1:] @ v[:, s0:s1].transpose(-1, -2) / math.sqrt(hd), dim=-1)[:, 0].mean(0)
    score = (rel / rel.sum() + sem / sem.sum()) * v[:, s0:s1].mean(0).norm(p=1, dim=-1)
    return score.topk(t).indices.sort().values.tolist()


# ----------------------------------------------------------------------------- tests
@torch.no_grad()
def test_tower_cut_and_layout_equal_the_official_loop(adapter):
    """Per image: the tiles' in-CLIP cut (one batch, the maximum count over the tiles), the stitched and unpadded
    survivors, no newline; the image sends what the official anyres branch builds."""
    batch = make_batch(adapter, SIZES)
    m = _flowcut(adapter)
    assert (m.port, m.next_target(), m.next_tile_keep()) == ("llava_next", 16, 8)
    prepared = adapter.prepare(batch, m, seeds(8))
    assert prepared.extras["newline_tokens_kept"] == [0] * 8
    cut = False
    for i in range(8):
        ref = _official_image(adapter, batch["pixel_values"][i], batch["image_sizes"][i], 16)
        s0, s1 = prepared.extras["image_spans"][i].tolist()
        assert s1 - s0 == ref.shape[0] == prepared.visual_tokens_kept[i]
        torch.testing.assert_close(prepared.inputs_embeds[i, s0:s1], ref, atol=1e-4, rtol=1e-4)  # SDPA vs the loop's bmm
        counts = prepared.extras["vision_tokens_per_layer"][i]
        cut |= len(set(counts)) > 2  # an entropy cut before the last one
    assert cut, "no intermediate entropy cut happened: the test does not exercise adaptive_prune_ratio"


@torch.no_grad()
def test_llm_stage_scores_the_official_layer_1_rows():
    """Layer 1's stage: the kept set is the official normalised relation + semantic score of the last prompt token,
    read from an eager forward; ``target_num`` tokens enter layers 2+."""
    a, eager = _adapter(), _adapter(attn="eager")
    m = _flowcut(a)
    prepared = a.prepare(make_batch(a, SIZES[2:3]), m, seeds(1))
    a.prefill(prepared, m)
    (st,) = prepared.extras["llm_stages"]
    assert st["layer"] == 2 and prepared.visual_tokens_kept == [40]
    assert st["kept_index"][0].tolist() == _official_llm_keep(eager, prepared, 16)
    assert prepared.extras["visual_tokens_per_layer"][0].tolist() == [40, 40, 16, 16]


@torch.no_grad()
def test_pruned_generate_equals_physical_removal(adapter):
    """The stage's kept tokens removed by hand after layer 1, positions renumbered (the official ``arange``), give the
    same logits and greedy tokens."""
    m = _flowcut(adapter)
    prepared = adapter.prepare(make_batch(adapter, SIZES[2:3]), m, seeds(1))
    out = adapter.prefill(prepared, m)
    stages = {"span": prepared.extras["image_spans"][0].tolist(), "stages": prepared.extras["llm_stages"]}
    assert stages["stages"] and m.plan_for(80, 40, 4)[0].renumber
    ref = _reference_logits(adapter, prepared.inputs_embeds, stages, True)
    torch.testing.assert_close(out.logits[0, -1], ref[0, -1], atol=1e-4, rtol=1e-4)
    assert adapter.generate(prepared, max_new_tokens=STEPS, method=m)[0].tolist() == _reference_generate(adapter, prepared, stages, True, STEPS)


def test_ratio_zero_is_the_unpruned_model_bit_for_bit(adapter):
    m = _flowcut(adapter, 0.0)
    batch = make_batch(adapter, SIZES[:4])
    prepared = adapter.prepare(batch, m, seeds(4))
    assert prepared.visual_tokens_kept == prepared.visual_tokens_in  # every packed token, newlines included
    ours = adapter.generate(prepared, max_new_tokens=STEPS, method=m)
    ref = adapter.model.generate(**batch, max_new_tokens=STEPS, do_sample=False, pad_token_id=PAD, eos_token_id=None)[:, batch["input_ids"].shape[1]:]
    assert torch.equal(ours, ref)
    one = adapter.prepare(one_sample(batch, 1), m, seeds(1))
    with torch.no_grad():
        full = adapter.model(**one_sample(batch, 1), logits_to_keep=1)
    assert torch.equal(adapter.prefill(one, m).logits, full.logits)
    # a second prefill of the same inputs (the efficiency pass repeats it) reads no per-stage record of the first as per sample
    assert torch.equal(adapter.prefill(one, m).logits, full.logits)


def test_batch_of_8_equals_batch_of_1(adapter):
    m = _flowcut(adapter)
    batch = make_batch(adapter, SIZES)
    prepared = adapter.prepare(batch, m, seeds(8))
    assert len(set(prepared.visual_tokens_kept)) > 1
    together = adapter.generate(prepared, max_new_tokens=STEPS, method=m)
    groups = prepared.extras["llm_stage_groups"]
    for i in range(8):
        p1 = adapter.prepare(one_sample(batch, i), m, seeds(8)[i:i + 1])
        s0, s1 = prepared.extras["image_spans"][i].tolist()
        r0, r1 = p1.extras["image_spans"][0].tolist()
        assert torch.equal(p1.inputs_embeds[0, r0:r1], prepared.inputs_embeds[i, s0:s1])
        single = adapter.generate(p1, max_new_tokens=STEPS, method=m)[0].tolist()
        assert together[i].tolist()[: len(single)] == single
        g = next(g for g in groups if i in g["samples"])
        for s, s1_ in zip(g["stages"], p1.extras["llm_stages"]):
            assert torch.equal(s["kept_index"][g["samples"].index(i)], s1_["kept_index"][0])


def test_analytic_flops_equal_the_counter(adapter):
    """The cut tower block by block on each tile's tokens, the projector on the survivors, the selection's CLS and
    semantic rows and the LLM stage's two rows, the layers on their tokens: equal to the FLOP counter."""
    from bench.measure.flops import analytic_adapter, count_flops

    batch = make_batch(adapter, SIZES[2:3])
    m = _flowcut(adapter)
    prepared = adapter.prepare(batch, m, seeds(1))
    counted, _ = count_flops(lambda: adapter.prefill(prepared, m))
    got = analytic_adapter(adapter, m, prepared, batch)
    assert got.selection > 0 and prepared.extras["vision_projected"] == [40]
    assert got.vision + got.projector + got.llm + got.lm_head + got.selection == pytest.approx(
        count_flops(lambda: adapter.prepare(batch, m, seeds(1)))[0] + counted, rel=1e-9)


def test_refusals_and_record(adapter):
    from bench.models.llava_next import LlavaNextAdapter

    image = LlavaNextAdapter(name="tiny_next_deep", source="none", weights="random", device="cpu", dtype="float32", budget="image")
    image.model = adapter.model
    with pytest.raises(IncompatibleMethodError, match="model.budget=tile"):
        image.check_method(create("flowcut", RATIO))
    with pytest.raises(IncompatibleMethodError, match="port='llava'"):
        adapter.check_method(create("flowcut", RATIO, port="llava"))
    with pytest.raises(IncompatibleMethodError, match="Qwen2.5-VL port only"):
        adapter.check_method(create("flowcut", RATIO, budget="layer_mean"))
    m = _flowcut(adapter)
    assert m.describe()["port"] == "llava_next" and "next_ref_tokens" not in m.describe()
    assert m.resolved_options() == {"port": "llava_next"} and create("flowcut", RATIO).resolved_options() == {"port": "llava"}
    assert any("decoding positions" in d for d in m.deviations) and create("flowcut", RATIO).deviations == ()
    fields = m.budget_fields(88, 4, 16.0, [40, 40, 16, 16])
    assert fields["budget_tokens"] == 16 and fields["budget_measured"] == 16 and fields["budget_met"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_of_8_equals_batch_of_1():
    """fp16 on CUDA: each image's tiles run the cut tower on their own, so a sample's rows and its LLM stage do not
    depend on its batch neighbours."""
    a = _adapter(device="cuda", dtype="float16")
    m = _flowcut(a)
    batch = make_batch(a, SIZES)
    prepared = a.prepare(batch, m, seeds(8))
    together = a.generate(prepared, max_new_tokens=STEPS, method=m)
    for i in range(8):
        p1 = a.prepare(one_sample(batch, i), m, seeds(8)[i:i + 1])
        s0, s1 = prepared.extras["image_spans"][i].tolist()
        r0, r1 = p1.extras["image_spans"][0].tolist()
        assert torch.equal(p1.inputs_embeds[0, r0:r1], prepared.inputs_embeds[i, s0:s1])
        single = a.generate(p1, max_new_tokens=STEPS, method=m)[0].tolist()
        assert together[i].tolist()[: len(single)] == single


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_shapes_cuda():
    """LLaVA-NeXT-7B's architecture (random weights, fp16) at 672 x 672: ratio 1 - 640/2880 is the paper's 640: 320
    patches per tile in CLIP (1,600 sent, no newline), 640 from LLM layer 2 on."""
    import yaml
    from hydra.utils import get_class

    from bench.families import CONF

    cfg = yaml.safe_load((CONF / "llava_next_7b.yaml").read_text())
    cfg.update(device="cuda", weights="random", budget="tile")
    a = get_class(cfg.pop("_target_"))(**cfg).load()
    m = create("flowcut", 1 - 640 / 2880)
    a.check_method(m)
    prepared = a.prepare(a.probe_batch(batch_size=1), m, seeds(1))
    assert prepared.visual_tokens_in == [2880 + 48] and prepared.visual_tokens_kept == [5 * 320]
    out = a.prefill(prepared, m)
    assert torch.isfinite(out.logits).all()
    assert prepared.extras["visual_tokens_per_layer"][0].tolist() == [1600, 1600] + [640] * 30
