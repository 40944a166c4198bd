"""Qwen2.5-VL adapter on a tiny random-config ``Qwen2_5_VLForConditionalGeneration`` (CPU, float32).

Patch 14, 2x2 merger, windowed attention (window 56 px = 2 x 2 merged tokens) with one full-attention
block; images of different sizes give different merged grids per sample; M-RoPE with mrope_section [2, 3, 3].
"""

from __future__ import annotations

import pytest
import torch

from bench.errors import IncompatibleMethodError
from methods.registry import create

PAD, EOS, IMG, VSTART, VEND = 0, 2, 150, 151, 152
GRIDS = [(8, 8), (6, 10), (10, 4), (8, 12), (4, 4), (12, 8), (6, 6), (10, 10)]  # patch grids (H, W), even


def tiny_qwen(seed: int = 0, vision_depth: int = 2, llm_layers: int = 2):
    """A random tiny Qwen2.5-VL (SDPA, fp32) with the test token ids; windowed tower with block 1 full-attention."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
        text_config=dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=llm_layers, num_attention_heads=4,
                         num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        image_token_id=IMG, video_token_id=153, vision_start_token_id=VSTART, vision_end_token_id=VEND,
    )
    for c in (cfg, cfg.vision_config, cfg.text_config):
        c._attn_implementation = "sdpa"
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def adapter():
    from bench.models.qwen25vl import Qwen25VLAdapter

    a = Qwen25VLAdapter(name="tiny_qwen", source="none", weights="random", device="cpu", dtype="float32")
    a.model = tiny_qwen()
    return a


def make_batch(grids, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, pix = [], []
    for i, (h, w) in enumerate(grids):
        n = (h // 2) * (w // 2)
        before, after = 3 + i % 3, 4 + (i * 2) % 5
        text = torch.randint(3, IMG, (before + after,), generator=g)
        rows.append(torch.cat([text[:before], torch.tensor([VSTART]), torch.full((n,), IMG), torch.tensor([VEND]), text[before:]]))
        pix.append(torch.randn(h * w, 3 * 2 * 14 * 14, generator=g))
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), PAD)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        mask[i, t - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(pix),
            "image_grid_thw": torch.tensor([[1, h, w] for h, w in grids]), "mm_token_type_ids": (ids == IMG).int()}


def one_sample(batch, i):
    """Sample ``i`` of a :func:`make_batch` batch as a batch of one (its padding dropped, its own patches)."""
    offs = [0] + batch["image_grid_thw"].prod(-1).cumsum(0).tolist()
    valid = batch["attention_mask"][i].bool()
    one = {"input_ids": batch["input_ids"][i:i + 1, valid], "pixel_values": batch["pixel_values"][offs[i]:offs[i + 1]],
           "image_grid_thw": batch["image_grid_thw"][i:i + 1]}
    one["attention_mask"] = torch.ones_like(one["input_ids"])
    one["mm_token_type_ids"] = (one["input_ids"] == IMG).int()
    return one


def seeds(n):
    return torch.arange(n, dtype=torch.long) + 5


def test_ratio_zero_is_the_unpruned_model_bit_for_bit(adapter):
    batch = make_batch(GRIDS[:3])
    prepared = adapter.prepare(batch, create("divprune", 0.0), seeds(3))
    ours = adapter.generate(prepared, max_new_tokens=6)
    ref = adapter.model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=PAD)[:, batch["input_ids"].shape[1]:]
    assert torch.equal(ours, ref)
    # logits bit for bit per sample (the tower batched over several images differs in the last bits on CPU;
    # the adapter encodes one image at a time)
    one = make_batch(GRIDS[1:2])
    with torch.no_grad():
        full = adapter.model(**one, logits_to_keep=1)
    assert torch.equal(adapter.prefill(adapter.prepare(one, create("divprune", 0.0), seeds(1))).logits, full.logits)


def manual_decode(model, embeds, pos, steps):
    """Greedy decoding by hand: the next position is max(prompt positions) + 1 in every M-RoPE dimension."""
    out = model(inputs_embeds=embeds, position_ids=pos, use_cache=True)
    nxt_pos = int(pos.max()) + 1
    toks = []
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1)
        toks.append(int(nxt))
        if int(nxt) == EOS:
            break
        p = torch.full((3, 1, 1), nxt_pos)
        nxt_pos += 1
        out = model(input_ids=nxt.view(1, 1), position_ids=p, past_key_values=out.past_key_values, use_cache=True)
    return toks


@pytest.mark.parametrize("method", ["divprune", "random"])
def test_pruned_generate_equals_physical_removal(adapter, method):
    """Reference: the unpruned model's own embeddings and get_rope_index positions, rows of the dropped tokens deleted."""
    batch = make_batch(GRIDS[:3])
    m = create(method, 0.7)
    prepared = adapter.prepare(batch, m, seeds(3))
    ours = adapter.generate(prepared, max_new_tokens=5)
    with torch.no_grad():
        pos_full, _ = adapter.model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                                        image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
        feats = adapter.model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        from methods.base import VisionContext

        for i, (h, w) in enumerate(GRIDS[:3]):
            valid = batch["attention_mask"][i].bool()
            seq = batch["input_ids"][i][valid]
            emb = adapter.model.get_input_embeddings()(seq).clone()
            at = (seq == IMG).nonzero().flatten()
            emb[at] = feats[i]
            idx = m.select(feats[i].unsqueeze(0), VisionContext((h // 2, w // 2), False, seeds(3)[i].view(1)))[0]
            assert idx.shape[0] == m.n_keep(len(at)) == prepared.visual_tokens_kept[i]
            keep = torch.ones(len(seq), dtype=torch.bool)
            keep[at] = False
            keep[at[idx]] = True
            toks = manual_decode(adapter.model, emb[keep].unsqueeze(0), pos_full[:, i][:, valid][:, keep].unsqueeze(1), 5)
            assert ours[i].tolist()[: len(toks)] == toks


def test_batch_of_8_equals_batch_of_1(adapter):
    batch = make_batch(GRIDS)
    m = create("divprune", 0.6)
    prepared = adapter.prepare(batch, m, seeds(8))
    together = adapter.generate(prepared, max_new_tokens=4)
    for i in range(8):
        p1 = adapter.prepare(one_sample(batch, i), m, seeds(8)[i:i + 1])
        assert p1.visual_tokens_kept[0] == prepared.visual_tokens_kept[i]
        assert together[i].tolist() == adapter.generate(p1, max_new_tokens=4)[0].tolist()


def test_kept_tokens_keep_their_3d_positions(adapter):
    batch = make_batch(GRIDS[:2])
    prepared = adapter.prepare(batch, create("random", 0.5), seeds(2))
    pos_full = adapter.rope_positions(batch)
    for i, (h, w) in enumerate(GRIDS[:2]):
        s0, s1 = prepared.extras["image_spans"][i].tolist()
        kept_pos = prepared.extras["position_ids"][:, i, s0:s1]
        at = (batch["input_ids"][i] == IMG).nonzero().flatten()
        full = pos_full[:, i, at]
        # every kept token's (t, h, w) is one of the unpruned image positions, in raster order
        cols = [int(((full == kept_pos[:, j:j + 1]).all(0)).nonzero()[0]) for j in range(kept_pos.shape[1])]
        assert cols == sorted(cols) and len(set(cols)) == len(cols) == prepared.visual_tokens_kept[i]
        assert (kept_pos[1] - kept_pos[1].min()).max() <= h // 2 - 1 and len(kept_pos[2].unique()) > 1
        # the text after the image keeps its original positions; decoding continues from max + 1
        last = prepared.extras["position_ids"][:, i, -1]
        assert torch.equal(last, pos_full[:, i, -1]) and int(last.max()) == int(pos_full[:, i].max())


def test_refusals(adapter):
    for name in ("fastervlm", "vispruner", "prumerge"):
        with pytest.raises(IncompatibleMethodError):
            adapter.check_method(create(name, 0.5))
    with pytest.raises(IncompatibleMethodError, match="renumbers positions"):
        adapter.check_method(create("pdrop", 0.5, budget="layer_mean"))
    adapter.check_method(create("fastv", 0.5))
    adapter.check_method(create("divprune", 0.5))


@pytest.mark.parametrize("size", [(56, 56), (112, 84)])
def test_probe_batch_runs(adapter, size):
    batch = adapter.probe_batch(batch_size=2, size=size)
    prepared = adapter.prepare(batch, create("divprune", 0.5), seeds(2))
    assert prepared.visual_tokens_in[0] == (size[0] // 28) * (size[1] // 28)
    assert adapter.prefill(prepared).logits.shape[:2] == (2, 1)


@pytest.mark.parametrize("model", ["qwen25vl_7b", "qwen25vl_3b", "llava_next_7b", "llava_next_mistral_7b"])
def test_real_configs_build_and_probe_at_real_shapes(model):
    """The committed architecture configs build the real model (on the meta device) and the probe has the real counts."""
    import yaml
    from hydra.utils import get_class

    from bench.models.base import FlopsDescription

    cfg = yaml.safe_load(open(f"conf/model/{model}.yaml"))
    cfg.update(device="cpu", weights="random")
    a = get_class(cfg.pop("_target_"))(**cfg)
    import transformers

    conf = a._architecture_config()
    with torch.device("meta"):
        a.model = getattr(transformers, a.model_class_name)(conf)
    desc = a.flops_description()
    assert isinstance(desc, FlopsDescription) and desc.llm_layers == a.num_llm_layers
    if model.startswith("qwen"):
        assert desc.llm_kv_heads < desc.llm_heads and desc.vision_full_layers == (7, 15, 23, 31) and desc.vision_window == 8
        for size, n in (((448, 448), 256), ((1008, 1008), 1296)):
            assert a.probe_batch(size=size)["input_ids"].eq(a.image_token_id).sum() == n
    else:
        assert a.probe_batch()["input_ids"].eq(a.image_token_id).sum() == 576 + 48 * 48 + 48
