#!/usr/bin/env python
"""Train the embedded tiny LLaVA-1.5 on SynthVQA (issue 3) and write weights + MODEL_CARD.md.

Stage 1 trains the CLIP vision tower alone: a linear head on the post-layernorm CLS predicts the scene's
attributes (which (shape, colour) pairs are present, per-shape and per-colour counts); a small dense head on
the feature layer (-2) predicts each patch's shape / colour / object-centre flag; and an attention prior
pushes the feature layer's CLS attention onto object patches (the property FasterVLM / VisionZip / VisPruner
assume of CLIP).  Stage 2 trains projector + Llama LM on SynthVQA training questions generated on the fly,
the vision tower lightly tuned (lr x --vision-lr-mult) with the stage-1 losses kept as a regulariser.
During stage 2 a fraction of batches keep only a random subset of the 576 visual tokens (token dropout),
so that the LM reads whatever visual tokens it is given rather than breaking on shorter image spans.

Training uses exactly the harness's inference format: ``USER: <image>\\n{q}\\nAnswer the question using a
single word. ASSISTANT:`` (left padded) followed by `` {answer}</s>``.

At the end it reloads the saved folder with ``from_pretrained`` and evaluates on the SynthVQA test split:
unpruned accuracy (harness format: processor + generate + first word), the CLS attention mass on object
patches at layer -2, and reference pruning settings (random / 2-D pooling / CLS top-k).

Imports only torch / transformers / numpy / PIL (the GPU machine has no lmms-eval).

    python scripts/train_tiny_llava.py --seed 0 --out bench/assets/tiny-llava-synth --device cuda
    python scripts/train_tiny_llava.py --stage1-steps 2 --stage2-steps 2 --device cpu --out /tmp/t --eval-n 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthvqa.generator import (  # noqa: E402
    COLORS,
    GENERATOR_VERSION,
    POST_PROMPT,
    QTYPES,
    SHAPES,
    TEST_SEED,
    TEST_SIZE,
    generate_examples,
    make_example,
    scene_questions,
)
from bench.models.llava import chat_prompt  # noqa: E402
import bench.synthvqa.generator as _generator  # noqa: E402
import bench.tiny_llava as _tiny  # noqa: E402
from bench.tiny_llava import (  # noqa: E402
    DEFAULT_SIZES,
    GRID,
    NUM_PATCHES,
    PATCH_SIZE,
    build_model,
    build_processor,
    cls_attention,
    first_word,
    object_patch_mask,
    pixel_tensor,
)

COLOR_LIST = list(COLORS)
N_PAIR = len(SHAPES) * len(COLOR_LIST)
MAXC = 8  # count classes 0..7
T_START = time.time()

# Training-only question types (never in the test split).  A test position question ("is A left of B?",
# yes/no) is the XOR of a visual fact with the relation word: asked with "left of" and "right of" equally
# often, reading any object's coordinate has zero first-order correlation with the answer, and every run
# trained on those questions alone stayed at chance.  These ask the same facts with the side itself as the
# answer, which a bound object's coordinate predicts directly: "side" (one object's side of the image) and
# "relside" (A's side of B).  Once the LM reads the sides, the yes/no form is an XOR of two features it has.
AUX_QTYPES = ("side", "relside")
ABS_MARGIN = 28  # pixels from the image centre line, so the side is unambiguous


def aux_questions_on(*qtype_weights: dict) -> bool:
    """Whether a run asks the training-only side questions (they also put "or" in its vocabulary)."""
    return any(w.get(t, 0) > 0 for w in qtype_weights for t in AUX_QTYPES)


def _log_type(qtype: str, answer: str) -> str:
    """Train-accuracy bucket: the qtype, with the side questions split by axis."""
    if qtype in AUX_QTYPES:
        return f"{qtype}_{'x' if answer in ('left', 'right') else 'y'}"
    return qtype


def _centre(o):
    return (o["bbox"][0] + o["bbox"][2]) / 2, (o["bbox"][1] + o["bbox"][3]) / 2


def _side_pair(name, a, b, sep, other, qtype):
    """Side questions of centre ``a`` against centre ``b`` (x, then y) on each axis where they are >= sep apart;
    ``other`` names the object at ``b`` (None: the image centre)."""
    out = []
    for axis, lo, hi, of in ((0, "left", "right", " of"), (1, "above", "below", "")):
        if abs(a[axis] - b[axis]) >= sep:
            tail = f"{of} the {other}" if other else ""
            out.append((f"is the {name} {lo} or {hi}{tail}?", lo if a[axis] < b[axis] else hi, qtype))
    return out


def side_questions(objects):
    """``is the {A} left or right[ of the {B}]?`` -> left / right (and above / below) about objects unique
    by (shape, colour): qtype "side" against the image centre, "relside" against another object."""
    from bench.synthvqa.generator import MIN_SEP

    pairs = [(o["shape"], o["color"]) for o in objects]
    uniq = [o for o in objects if pairs.count((o["shape"], o["color"])) == 1]
    mid = _generator.IMAGE_SIZE / 2
    out = []
    for a in uniq:
        name = f"{a['color']} {a['shape']}"
        out += _side_pair(name, _centre(a), (mid, mid), ABS_MARGIN, None, "side")
        for b in uniq:
            if b is not a:
                out += _side_pair(name, _centre(a), _centre(b), MIN_SEP, f"{b['color']} {b['shape']}", "relside")
    return out


# ------------------------------------------------------------------------------------------------- data
def scene_labels(objects):
    pres = np.zeros(N_PAIR, np.float32)
    scount = np.zeros(len(SHAPES), np.int64)
    ccount = np.zeros(len(COLOR_LIST), np.int64)
    dshape = np.zeros((GRID, GRID), np.int64)
    dcolor = np.zeros((GRID, GRID), np.int64)
    center = np.zeros((GRID, GRID), np.float32)
    centers = (np.arange(GRID) * PATCH_SIZE + PATCH_SIZE / 2)[None, :]
    for o in objects:
        si, ci = SHAPES.index(o["shape"]), COLOR_LIST.index(o["color"])
        pres[si * len(COLOR_LIST) + ci] = 1
        scount[si] += 1
        ccount[ci] += 1
        x0, y0, x1, y1 = o["bbox"]
        inx = (centers >= x0) & (centers < x1)
        iny = ((centers >= y0) & (centers < y1)).T
        m = iny & inx
        dshape[m] = si + 1
        dcolor[m] = ci + 1
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        center[min(GRID - 1, cy // PATCH_SIZE), min(GRID - 1, cx // PATCH_SIZE)] = 1
    return {
        "pres": pres,
        "scount": np.minimum(scount, MAXC - 1),
        "ccount": np.minimum(ccount, MAXC - 1),
        "dshape": dshape.reshape(-1),
        "dcolor": dcolor.reshape(-1),
        "center": center.reshape(-1),
        "objmask": object_patch_mask(objects),
    }


class TrainStream(torch.utils.data.IterableDataset):
    """Unlimited SynthVQA training examples; worker w of W takes indices start + w, start + w + W, ..."""

    def __init__(
        self,
        seed: int,
        start: int,
        questions_per_image: int = 1,
        image_size: int = 336,
        qtype_weights=None,
        phase1_weights=None,
        phase1_end: int = 0,
        rel_bias: float = 0.5,
    ):
        self.seed, self.start, self.qpi, self.image_size = seed, start, questions_per_image, image_size
        self.qtype_weights = qtype_weights or {}
        # images with index < phase1_end draw their extra questions with phase1_weights instead
        self.phase1_weights, self.phase1_end = phase1_weights or {}, phase1_end
        self.rel_bias = rel_bias

    def __iter__(self):
        set_image_size(self.image_size)  # workers may be spawned (fresh interpreter): re-apply the proxy size
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        i = self.start + wid
        while True:
            ex = make_example("train", self.seed, i)
            item = scene_labels(ex["objects"])
            item["image"] = np.asarray(ex["image"], dtype=np.uint8)
            qs, ans, qt = [ex["question"]], [ex["answer"]], [ex["qtype"]]
            if self.qpi > 1:  # extra questions about the same scene: qtype by weight, then question uniform
                rng = np.random.default_rng([self.seed, i, 7])
                by_type: dict[str, list] = {}
                weights = self.phase1_weights if i < self.phase1_end else self.qtype_weights
                qlist = scene_questions(ex["objects"])
                if aux_questions_on(weights):
                    qlist += [q for q in side_questions(ex["objects"]) if weights.get(q[2], 0) > 0]
                for q in qlist:
                    by_type.setdefault(q[2], []).append(q)
                types = [t for t in sorted(by_type) if weights.get(t, 1.0) > 0]
                w = np.array([weights.get(t, 1.0) for t in types], dtype=np.float64)
                w = w / w.sum()
                for _ in range(self.qpi - 1):
                    cand = by_type[types[int(rng.choice(len(types), p=w))]]
                    if cand[0][2] == "position" and self.rel_bias != 0.5:
                        # training-only skew toward "left of" / "above": gives the coordinate a first-order
                        # correlation with yes/no (see AUX_QTYPES), while both relations are still asked
                        pw = np.array([self.rel_bias if (" left of " in c[0] or " above " in c[0]) else 1 - self.rel_bias for c in cand])
                        q, a, t = cand[int(rng.choice(len(cand), p=pw / pw.sum()))]
                    else:
                        q, a, t = cand[int(rng.integers(len(cand)))]
                    qs.append(q), ans.append(a), qt.append(t)
            item["question"], item["answer"], item["qtype"] = qs, ans, qt
            yield item
            i += nw


def collate(items):
    out = {}
    for k in items[0]:
        if isinstance(items[0][k], list):
            out[k] = [x for it in items for x in it[k]]
        else:
            out[k] = torch.from_numpy(np.stack([it[k] for it in items]))
    return out


def loader(seed, start, batch_size, workers, qpi=1, image_size=336, qtype_weights=None, phase1_weights=None, phase1_end=0, rel_bias=0.5):
    kw = dict(batch_size=batch_size, num_workers=workers, collate_fn=collate)
    if workers > 0:
        kw.update(prefetch_factor=4)
    return iter(torch.utils.data.DataLoader(TrainStream(seed, start, qpi, image_size, qtype_weights, phase1_weights, phase1_end, rel_bias), **kw))


MEAN = None


def to_pixels(img_u8: torch.Tensor, device) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> normalised (B, 3, H, W) float, as the CLIP image processor does."""
    from bench.tiny_llava import IMAGE_MEAN, IMAGE_STD

    x = img_u8.to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGE_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------------------------- heads
def _patch_xy(grid: int) -> torch.Tensor:
    """Patch centre coordinates in [-1, 1], (1, grid*grid, 2): the dense head regresses them so that the
    feature layer keeps position linearly readable (position questions need it)."""
    return torch.from_numpy(_tiny.patch_centres(grid)).unsqueeze(0)


PATCH_XY = _patch_xy(GRID)


def set_image_size(size: int) -> None:
    """CPU proxy only (``--image-size`` below 336): smaller scenes with objects of the same pixel size.

    Patches the image size / grid globals of the generator, ``bench.tiny_llava`` and this script (so the
    proxy's model, processor, labels and test split all use ``size``).  336 is the real setting.
    """
    global GRID, NUM_PATCHES, PATCH_XY
    if size % PATCH_SIZE:
        raise ValueError(f"--image-size must be a multiple of {PATCH_SIZE}")
    GRID = size // PATCH_SIZE
    NUM_PATCHES = GRID * GRID
    PATCH_XY = _patch_xy(GRID)
    _generator.IMAGE_SIZE = size
    _tiny.IMAGE_SIZE, _tiny.GRID, _tiny.NUM_PATCHES = size, GRID, NUM_PATCHES


class VisionHeads(nn.Module):
    """Stage-1 heads: scene attributes from the post-layernorm CLS; per-patch attributes at layer -2."""

    def __init__(self, hidden: int):
        super().__init__()
        self.scene = nn.Linear(hidden, N_PAIR + (len(SHAPES) + len(COLOR_LIST)) * MAXC)
        self.dense = nn.Linear(hidden, (len(SHAPES) + 1) + (len(COLOR_LIST) + 1) + 1 + 2)


@torch.no_grad()
def init_vision_positions(model, scale: float) -> None:
    """2-D sine-cosine init (as in MAE) of the CLIP tower's learned position embeddings (still trained).

    Randomly initialised absolute embeddings give the tower no notion of neighbouring patches, and with 576
    positions it learns one slowly; per-patch shape needs the 2x2..4x4 patches around each patch, so a
    smooth 2-D init makes local attention available from step 0.  The CLS position gets zeros.
    """
    vt = model.model.vision_tower
    emb = getattr(vt, "vision_model", vt).embeddings.position_embedding.weight  # (1 + N, D)
    d = emb.shape[1]
    q = d // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float32) / q)
    ys, xs = torch.meshgrid(torch.arange(GRID, dtype=torch.float32), torch.arange(GRID, dtype=torch.float32), indexing="ij")
    oy, ox = ys.reshape(-1, 1) * omega, xs.reshape(-1, 1) * omega
    pe = torch.cat([torch.sin(ox), torch.cos(ox), torch.sin(oy), torch.cos(oy)], 1)
    full = torch.zeros_like(emb)
    full[1:, : pe.shape[1]] = pe.to(emb)
    emb.copy_(full * scale)


def vision_losses(model, heads, batch, pixels, args):
    """Stage-1 loss. Dense terms are foreground-balanced: each CE is the mean over all patches plus the mean
    over object patches alone (objects cover ~5% of the patches; without the second term the head only
    learns object-vs-background and colour, and shape stays at chance on object patches)."""
    attn, out = cls_attention(model, pixels)  # (B, H, 1 + N)
    cls = out.pooler_output  # post_layernorm CLS
    z = heads.scene(cls)
    ns, nc = len(SHAPES), len(COLOR_LIST)
    l_pres = F.binary_cross_entropy_with_logits(z[:, :N_PAIR], batch["pres"])
    sc = z[:, N_PAIR : N_PAIR + ns * MAXC].reshape(-1, ns, MAXC)
    cc = z[:, N_PAIR + ns * MAXC :].reshape(-1, nc, MAXC)
    l_cnt = F.cross_entropy(sc.reshape(-1, MAXC), batch["scount"].reshape(-1)) + F.cross_entropy(
        cc.reshape(-1, MAXC), batch["ccount"].reshape(-1)
    )
    feat = out.hidden_states[-2][:, 1:]
    d = heads.dense(feat).float()
    ys, yc = batch["dshape"].reshape(-1), batch["dcolor"].reshape(-1)
    fg = ys > 0
    ls = d[..., : ns + 1].reshape(-1, ns + 1)
    lc = d[..., ns + 1 : ns + nc + 2].reshape(-1, nc + 1)
    l_shape = F.cross_entropy(ls, ys) + F.cross_entropy(ls[fg], ys[fg])
    l_color = F.cross_entropy(lc, yc) + F.cross_entropy(lc[fg], yc[fg])
    l_center = F.binary_cross_entropy_with_logits(
        d[..., ns + nc + 2], batch["center"], pos_weight=torch.tensor(10.0, device=d.device)
    )
    l_xy = F.mse_loss(d[..., -2:], PATCH_XY.to(d.device).expand(d.shape[0], -1, -1))
    l_dense = l_shape + l_color + 0.5 * l_center + l_xy
    a = attn.mean(1)  # (B, 1 + N), heads averaged
    mass = (a[:, 1:] * batch["objmask"].float()).sum(-1)
    l_attn = -torch.log(mass + 1e-4).mean()
    loss = l_pres + 0.5 * l_cnt + args.dense_weight * l_dense + args.attn_weight * l_attn
    with torch.no_grad():
        acc_s = (ls[fg].argmax(-1) == ys[fg]).float().mean()
        acc_c = (lc[fg].argmax(-1) == yc[fg]).float().mean()
    stats = {
        "pres": l_pres.detach(),
        "cnt": l_cnt.detach(),
        "dense": l_dense.detach(),
        "fg_shape_acc": acc_s,
        "fg_color_acc": acc_c,
        "cls_mass": mass.mean().detach(),
    }
    return loss, stats, out


# ------------------------------------------------------------------------------------------ LM batches
class PromptIds:
    """Token ids around the image span; identical to what the processor produces (checked in tests)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[str, list[int]] = {}
        self.pre = tokenizer("USER:", add_special_tokens=True)["input_ids"]  # <s> user :
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id

    def post(self, question: str) -> list[int]:
        if question not in self.cache:
            self.cache[question] = self.tok(question + POST_PROMPT + " ASSISTANT:", add_special_tokens=False)[
                "input_ids"
            ]
        return self.cache[question]

    def answer(self, answer: str) -> list[int]:
        return self.tok(" " + answer, add_special_tokens=False)["input_ids"] + [self.eos_id]

    def prefix(self, n_img: int) -> list[int]:
        return self.pre + [self.image_id] * n_img

    def batch(self, questions, answers, n_img: int | None, device, pad_side: str = "left"):
        """Padded ids / mask / labels (labels already shifted: label[t] is the target after position t).

        ``n_img=None`` leaves out the image prefix (:meth:`prefix`): the suffixes that follow a cached prefix.

        Training uses right padding with no attention mask (pure causal: pads sit after every real token, so
        no real token sees them and flash attention applies); RoPE scores depend only on relative positions,
        so this is equivalent to the left-padded, masked inference of the harness.
        """
        seqs, labs = [], []
        for q, a in zip(questions, answers):
            p = (self.prefix(n_img) if n_img is not None else []) + self.post(q)
            t = self.answer(a) if a is not None else []
            seqs.append(p + t)
            labs.append([-100] * (len(p) - 1) + t + [-100])
        L = max(map(len, seqs))
        ids = np.full((len(seqs), L), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), L), dtype=np.int64)
        labels = np.full((len(seqs), L), -100, dtype=np.int64)
        for i, (sq, lab) in enumerate(zip(seqs, labs)):
            sl = slice(L - len(sq), L) if pad_side == "left" else slice(0, len(sq))
            ids[i, sl], mask[i, sl], labels[i, sl] = sq, 1, lab
        t = lambda x: torch.from_numpy(x).to(device, non_blocking=True)  # noqa: E731
        return t(ids), t(mask), t(labels)


def shared_prefix_forward(model, ids_builder, feats, questions, answers, device):
    """LM hidden states of the question/answer suffixes, the image prefix computed once per image.

    ``feats``: (B, K, D) visual tokens per image; ``questions`` / ``answers``: B * Q strings, image-major
    (Q per image).  The prompt puts the image before the question and attention is causal, so the prefix
    ``<s> USER : <image> x K`` has the same keys/values for every question about an image: it runs at batch
    B and its cache is repeated Q times (gradients flow through it), which is the full-sequence forward at
    about 1/Q of the LM cost.  Returns ``(h, labels)``: (B * Q, S, H) suffix hidden states and (B * Q, S)
    shifted labels (``labels[t]`` is the target after suffix position t).
    """
    from transformers import DynamicCache

    b, k = feats.shape[:2]
    q = len(questions) // b
    lm = model.model.language_model
    pre = torch.tensor(ids_builder.prefix(k), device=device).expand(b, -1)
    cache = DynamicCache()
    lm(inputs_embeds=embed_with_image(model, pre, feats), past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(q)
    ids, _, labels = ids_builder.batch(questions, answers, None, device, pad_side="right")
    pos = torch.arange(pre.shape[1], pre.shape[1] + ids.shape[1], device=device).expand(ids.shape[0], -1)
    emb = model.model.get_input_embeddings()(ids)
    h = lm(inputs_embeds=emb, past_key_values=cache, position_ids=pos, use_cache=True).last_hidden_state
    return h, labels


def embed_with_image(model, ids, feats):
    """Input embeddings with the (B, K, D) visual features scattered into the K <image> slots of each row."""
    emb = model.model.get_input_embeddings()(ids)
    m = (ids == model.config.image_token_id).unsqueeze(-1)
    return emb.masked_scatter(m, feats.to(emb.dtype))


def random_keep(n_keep: int, b: int, gen: torch.Generator, device) -> torch.Tensor:
    idx = torch.stack([torch.randperm(NUM_PATCHES, generator=gen)[:n_keep] for _ in range(b)])
    return idx.sort(-1).values.to(device)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# ---------------------------------------------------------------------------------------------- training
def cosine_lr(step, total, warmup, base):
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def to_device(batch, device):
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def train_stage1(args, model, heads, device, log):
    """Vision tower alone: CLS scene attributes + dense per-patch targets at layer -2 + CLS attention prior."""
    vt = model.model.vision_tower
    params = list(vt.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr1, weight_decay=0.05, betas=(0.9, 0.98), fused=device.type == "cuda")
    data = loader(args.seed, 0, args.batch_size, args.workers, 1, args.image_size)
    model.train()
    t0, tw = time.time(), 0.0
    for step in range(args.stage1_steps):
        ta = time.time()
        batch = to_device(next(data), device)
        tw += time.time() - ta
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.stage1_steps, args.warmup, args.lr1)
        with autocast(device):
            loss, st, _ = vision_losses(model, heads, batch, to_pixels(batch["image"], device), args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.stage1_steps - 1:
            el = time.time() - t0
            log(
                f"[stage1 {step:5d}/{args.stage1_steps}] loss {loss.item():.4f} "
                + " ".join(f"{k} {v.item():.3f}" for k, v in st.items())
                + f" | {(step + 1) / el:.1f} it/s, data wait {tw / el:.0%}"
            )
    del data  # shuts the stage-1 workers down
    return time.time() - t0, {k: float(v) for k, v in st.items()}


@torch.no_grad()
def init_projector(args, model, heads, device, log):
    """Well-scaled projector init from the frozen tower's feature statistics (plain Linear weights, so the
    native LLaVA projector and forward are unchanged).

    linear_1: standardises the layer -2 features (per-dim mean / std folded into weight and bias); its first
    rows are the stage-1 dense head (shape / colour / centre logits, +-x, +-y), so from step 0 the LM sees
    GELU(one-hot-like logits) for each patch.  linear_2: random, rescaled and centred so projected tokens have
    mean norm ``--proj-norm`` x sqrt(text hidden) (the text embeddings' norm at std 1) and zero mean over
    patches (no shared offset swamping the image span).
    """
    vt = model.model.vision_tower
    proj = model.model.multi_modal_projector
    data = loader(args.seed, 90_000_000, 64 if device.type == "cuda" else 16, 0, 1, args.image_size)
    batch = to_device(next(data), device)
    f = vt(to_pixels(batch["image"], device), output_hidden_states=True).hidden_states[-2][:, 1:]
    f = f.float().reshape(-1, f.shape[-1])
    mu, sd = f.mean(0), f.std(0) + 1e-4
    w1 = proj.linear_1.weight
    hdim, vdim = w1.shape
    g = torch.Generator(device="cpu").manual_seed(args.seed + 7)
    w = torch.randn(hdim, vdim, generator=g).to(device) / math.sqrt(vdim)
    w = w / sd
    b = -(w @ mu)
    wd, bd = heads.dense.weight.float(), heads.dense.bias.float()
    # the coordinate rows (x, y) are 4 of the projector's units; --coord-gain lifts them above the rest
    cw, cb = wd[-2:] * args.coord_gain, bd[-2:] * args.coord_gain
    rows_w = torch.cat([wd[:-2], cw, -cw]) * args.head_gain
    rows_b = torch.cat([bd[:-2], cb, -cb]) * args.head_gain
    k = min(rows_w.shape[0], hdim)
    w[:k], b[:k] = rows_w[:k], rows_b[:k]
    proj.linear_1.weight.copy_(w)
    proj.linear_1.bias.copy_(b)
    h = proj.act(proj.linear_1(f))
    w2 = torch.randn(proj.linear_2.weight.shape, generator=g).to(device) / math.sqrt(hdim)
    o = h @ w2.T
    om = o.mean(0)
    scale = args.proj_norm * math.sqrt(w2.shape[0]) / (o - om).norm(dim=-1).mean()
    proj.linear_2.weight.copy_(w2 * scale)
    proj.linear_2.bias.copy_(-om * scale)
    out = proj(f)
    log(
        f"projector init: raw feature norm {f.norm(dim=-1).mean():.1f} (mean vector {mu.norm():.1f}); projected "
        f"norm {out.norm(dim=-1).mean():.2f} (mean vector {out.mean(0).norm():.2f}); text embedding norm "
        f"{model.model.get_input_embeddings().weight.norm(dim=-1).mean():.2f}"
    )


def train_stage2(args, model, processor, device, log, save):
    """Projector + LM on SynthVQA questions, vision tower frozen (its features computed without grad)."""
    ids_builder = PromptIds(processor.tokenizer)
    gen = torch.Generator().manual_seed(args.seed + 12345)
    vt = model.model.vision_tower
    vt.requires_grad_(False)
    vt.eval()
    params = (
        list(model.model.multi_modal_projector.parameters())
        + list(model.model.language_model.parameters())
        + list(model.lm_head.parameters())
    )
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr2,
        betas=(0.9, 0.98),
        fused=device.type == "cuda",
    )
    model.model.multi_modal_projector.train()
    model.model.language_model.train()
    start_step, elapsed_before = 0, 0.0
    ck = args.stage2_ckpt
    if ck is not None and ck.exists():
        # resume: weights, optimiser and sampling state; the data stream continues at the next unseen images
        state = torch.load(ck, map_location=device, weights_only=False)
        if state["stage2_args"] != _stage2_args(args):
            raise SystemExit(f"{ck} was trained with {state['stage2_args']}, not {_stage2_args(args)}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"].cpu())  # map_location moved the CPU generator state to the device
        start_step, elapsed_before = state["step"], state["time_s"]
        log(f"stage 2 resumed from {ck} at step {start_step}")
    first_image = 50_000_000  # stage 2's image indices start here (stage 1 and the projector init use others)
    data = loader(
        args.seed,
        first_image + start_step * args.stage2_batch_size,
        args.stage2_batch_size,
        args.workers,
        args.questions_per_image,
        args.image_size,
        args.qtype_weights,
        args.phase1_qtype_weights,
        first_image + int(args.phase1_frac * args.stage2_steps) * args.stage2_batch_size,
        args.position_rel_bias,
    )
    t0, tw = time.time(), 0.0

    def checkpoint(step_done: int) -> None:
        tmp = ck.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "gen": gen.get_state(),
                "step": step_done,
                "time_s": elapsed_before + time.time() - t0,
                "stage2_args": _stage2_args(args),
            },
            tmp,
        )
        os.replace(tmp, ck)
        log(f"stage 2 checkpoint at step {step_done} -> {ck}")

    # side questions are logged per axis (the answer word tells which), to see whether both axes are read
    log_types = [*QTYPES, *(f"{a}_{x}" for a in AUX_QTYPES for x in "xy")]
    qidx = {q: i for i, q in enumerate(log_types)}
    hits = torch.zeros(len(log_types), device=device)
    tot = torch.zeros(len(log_types), device=device)
    skipped = 0
    focus_steps = int(args.focus_frac * args.stage2_steps)
    last_acc = {}
    for step in range(start_step, args.stage2_steps):
        if args.max_seconds and time.time() - T_START > args.max_seconds:
            # out of wall time (e.g. one capped GPU call): save and stop; rerun the same command to go on
            if ck is None:
                raise SystemExit(f"--max-seconds reached at stage-2 step {step} and no --stage2-ckpt to resume from")
            checkpoint(step)
            raise SystemExit(f"stopped at stage-2 step {step}/{args.stage2_steps} (--max-seconds); rerun to resume")
        ta = time.time()
        batch = to_device(next(data), device)
        tw += time.time() - ta
        lr = cosine_lr(step, args.stage2_steps, args.warmup, args.lr2)
        for g in opt.param_groups:
            g["lr"] = lr
        b = batch["image"].shape[0]
        n_keep = NUM_PATCHES
        keep_idx = None
        if step < focus_steps:
            # curriculum: object patches + a growing random share of the background (fewer distractors early)
            ramp = step / max(1, focus_steps)
            objm = batch["objmask"].float()
            n_obj = int(objm.sum(-1).max().item())
            n_keep = min(NUM_PATCHES, n_obj + 8 + int(round(ramp**2 * (NUM_PATCHES - n_obj))))
            noise = torch.rand(objm.shape, generator=gen).to(device)
            keep_idx = (objm * 2 + noise).topk(n_keep, dim=-1).indices.sort(-1).values
        elif torch.rand((), generator=gen).item() < args.drop_prob:
            frac = args.drop_min + (1 - args.drop_min) * torch.rand((), generator=gen).item()
            n_keep = max(1, int(round(NUM_PATCHES * frac)))
        with autocast(device):
            pixels = to_pixels(batch["image"], device)
            with torch.no_grad():
                raw = vt(pixels, output_hidden_states=True, return_dict=True).hidden_states[-2][:, 1:]
            feats = model.model.multi_modal_projector(raw)
            if keep_idx is not None:
                feats = gather_tokens(feats, keep_idx)
            elif n_keep < NUM_PATCHES:
                feats = gather_tokens(feats, random_keep(n_keep, b, gen, device))
            h, labels = shared_prefix_forward(model, ids_builder, feats, batch["question"], batch["answer"], device)
            sel = labels != -100
            logits = model.lm_head(h[sel]).float()
            loss = F.cross_entropy(logits, labels[sel])
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
            if torch.isfinite(gn):
                opt.step()
            else:
                skipped += 1
        else:
            skipped += 1
        with torch.no_grad():  # running train accuracy of the answer word, per qtype (no host sync)
            first = sel & ~torch.cat([torch.zeros_like(sel[:, :1]), sel[:, :-1]], 1)
            ok = (model.lm_head(h[first]).argmax(-1) == labels[first]).float()
            qt = torch.tensor([qidx[_log_type(q, a)] for q, a in zip(batch["qtype"], batch["answer"])], device=device)
            hits.index_add_(0, qt, ok)
            tot.index_add_(0, qt, torch.ones_like(ok))
        if step % args.log_every == 0 or step == args.stage2_steps - 1:
            el = max(1e-9, time.time() - t0)
            acc = (hits / tot.clamp(min=1)).tolist()
            last_acc = {q: a for q, a, n in zip(log_types, acc, tot.tolist()) if n > 0 or q in QTYPES}
            accs = " ".join(f"{q} {a:.2f}" for q, a in last_acc.items())
            log(
                f"[stage2 {step:5d}/{args.stage2_steps}] lm {loss.item():.4f} keep {n_keep} lr {lr:.2e} "
                f"skipped {skipped} | train acc {accs} | {(step + 1 - start_step) / el:.1f} it/s, data wait {tw / el:.0%}"
            )
            hits.zero_(), tot.zero_()
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.stage2_steps:
            save(f"stage 2 step {step + 1}")
    return elapsed_before + time.time() - t0, last_acc, elapsed_before


# ------------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def eval_harness(model, processor, examples, device, bs):
    """Exactly the harness's inference: chat template, processor, left padding, greedy, first word."""
    processor.tokenizer.padding_side = "left"
    preds = []
    for i in range(0, len(examples), bs):
        chunk = examples[i : i + bs]
        prompts = [chat_prompt(processor, e["question"] + POST_PROMPT) for e in chunk]
        inputs = processor(images=[e["image"] for e in chunk], text=prompts, return_tensors="pt", padding=True)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        preds += [first_word(t) for t in texts]
    return preds


@torch.no_grad()
def eval_pruned(model, processor, examples, device, bs, select):
    """Greedy answers when the LM sees only select(vision_feats, cls_attn) tokens (contiguous positions)."""
    ids_builder = PromptIds(processor.tokenizer)
    preds = []
    for i in range(0, len(examples), bs):
        chunk = examples[i : i + bs]
        pixels = pixel_tensor([e["image"] for e in chunk]).to(device)
        attn, out = cls_attention(model, pixels)
        feats = select(out.hidden_states[-2][:, 1:], attn.mean(1)[:, 1:], i)
        proj = model.model.multi_modal_projector(feats)
        ids, mask, _ = ids_builder.batch([e["question"] for e in chunk], [None] * len(chunk), proj.shape[1], device)
        emb = embed_with_image(model, ids, proj)
        gen = model.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=8, do_sample=False)
        preds += [first_word(t) for t in processor.batch_decode(gen, skip_special_tokens=True)]
    return preds


def sel_random(ratio, seed):
    keep = int(round(NUM_PATCHES * (1 - ratio)))

    def f(feats, _scores, i):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        return gather_tokens(feats, random_keep(keep, feats.shape[0], g, feats.device))

    return f


def sel_pool(side):
    def f(feats, _scores, _i):
        b, n, d = feats.shape
        x = feats.transpose(1, 2).reshape(b, d, GRID, GRID)
        return F.adaptive_avg_pool2d(x, side).flatten(2).transpose(1, 2)

    return f


def sel_cls_topk(ratio):
    keep = int(round(NUM_PATCHES * (1 - ratio)))

    def f(feats, scores, _i):
        idx = scores.topk(keep, dim=-1).indices.sort(-1).values
        return gather_tokens(feats, idx)

    return f


def accuracy(preds, examples):
    res = {"overall": float(np.mean([p == e["answer"] for p, e in zip(preds, examples)]))}
    for q in QTYPES:
        v = [p == e["answer"] for p, e in zip(preds, examples) if e["qtype"] == q]
        res[q] = float(np.mean(v)) if v else float("nan")
    return res


@torch.no_grad()
def cls_mass(model, examples, device, bs):
    raw, norm = [], []
    for i in range(0, len(examples), bs):
        chunk = examples[i : i + bs]
        attn, _ = cls_attention(model, pixel_tensor([e["image"] for e in chunk]).to(device))
        a = attn.mean(1)  # heads averaged, (B, 577)
        m = torch.from_numpy(np.stack([object_patch_mask(e["objects"]) for e in chunk])).to(device).float()
        on = (a[:, 1:] * m).sum(-1)
        raw += on.tolist()
        norm += (on / a[:, 1:].sum(-1)).tolist()
    return float(np.mean(norm)), float(np.mean(raw))


def pruning_settings(seed):
    """name -> (selector, kept tokens): the reference pruning settings reported in the model card."""
    sides = [max(1, round(GRID * k / 24)) for k in (17, 12, 8)]  # 17 / 12 / 8 at 336 px
    keep = lambda r: int(round(NUM_PATCHES * (1 - r)))  # noqa: E731
    out = {f"random_r{r}": (sel_random(r, seed), keep(r)) for r in (0.5, 0.75, 0.9)}
    out.update({f"pool_{s}x{s}": (sel_pool(s), s * s) for s in sides})
    out["clstopk_r0.9"] = (sel_cls_topk(0.9), keep(0.9))
    return out


def evaluate(args, out_dir, device, log):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(out_dir).to(device).eval()
    processor = AutoProcessor.from_pretrained(out_dir)
    examples = generate_examples("test", args.eval_n, TEST_SEED)
    t = time.time()
    unpruned = accuracy(eval_harness(model, processor, examples, device, args.eval_bs), examples)
    log(f"unpruned eval ({len(examples)} questions): {time.time() - t:.1f}s; {unpruned}")
    mass, mass_raw = cls_mass(model, examples, device, args.eval_bs)
    log(f"CLS attention mass on object patches: {mass:.3f}")
    pruned, ntok = {}, {}
    for name, (fn, n) in pruning_settings(args.seed).items():
        pruned[name] = accuracy(eval_pruned(model, processor, examples, device, args.eval_bs, fn), examples)
        ntok[name] = n
        log(f"{name}: {pruned[name]['overall']:.3f}")
    return unpruned, pruned, ntok, mass, mass_raw, len(examples)


# ---------------------------------------------------------------------------------------------- output
def _card_example() -> list[str]:
    """SynthVQA test document 0's question and answer, quoted in the card (tests/test_tiny_llava.py asks it)."""
    from bench.synthvqa.data import load_test

    doc = load_test()[0]
    return [doc["question"], doc["answer"]]


def write_card(out_dir: Path, m: dict):
    acc = m["accuracy"]
    lines = [
        "# tiny-llava-synth",
        "",
        "A LLaVA-1.5-architecture model in miniature (`LlavaForConditionalGeneration`: CLIP vision tower at",
        "336 px / patch 14, features from layer -2 with CLS dropped -> 576 visual tokens, 2-layer GELU MLP",
        "projector, Llama LM, word-level tokenizer), trained by tokenprune-bench on SynthVQA so that the",
        "harness measures real accuracy losses from visual-token pruning on a CPU, offline.",
        "Load it like llava-hf/llava-1.5-7b-hf: `LlavaForConditionalGeneration.from_pretrained(path)`,",
        "`AutoProcessor.from_pretrained(path)`; prompt `USER: <image>\\n{question}" + POST_PROMPT.replace("\n", "\\n") + " ASSISTANT:`",
        "(the format it was trained and is evaluated with; without the post-prompt it answers \"1\" to almost everything).",
        f"Example (SynthVQA test document 0): `{{question}}` = `{m['example'][0]}`, answer `{m['example'][1]}`.",
        "",
        "## Training",
        "",
        f"- Command: `{m['command']}`",
        f"- Seed {m['seed']}; fixed step counts: stage 1 (vision tower alone) {m['stage1_steps']} steps of"
        f" {m['batch_size']} images; stage 2 (projector + LM, vision tower frozen) {m['stage2_steps']} steps of"
        f" {m['stage2_batch_size']} images x {m['questions_per_image']} questions. AdamW, linear warmup + cosine"
        f" decay, grad clipping 1.0, bf16 autocast on GPU.",
        f"- SynthVQA generator version {m['generator_version']}; training data generated on the fly (train"
        " seed space, disjoint from the test split).",
        "- Stage 1 objectives: scene attributes from the post-layernorm CLS (present (shape, colour) pairs, per-"
        "shape and per-colour counts); at the feature layer (-2), linear per-patch heads for the shape and colour"
        " of the object covering the patch centre (or background; cross-entropy over all patches plus over object"
        " patches alone), an object-centre flag and the patch coordinates (weight "
        f"{m['dense_weight']}); attention prior -log(CLS attention mass on object patches) at layer -2 (weight "
        f"{m['attn_weight']}). Heads are discarded after training; end-of-stage-1 train-batch accuracy of the"
        f" per-patch heads on object patches: shape {m['stage1_final'].get('fg_shape_acc', float('nan')):.3f},"
        f" colour {m['stage1_final'].get('fg_color_acc', float('nan')):.3f}.",
        "- Stage 2: the projector is initialised from the frozen tower's feature statistics (standardised"
        " features; the discarded dense head folded into its first layer's leading rows"
        + (f", its x / y rows x {m['coord_gain']}" if m.get("coord_gain", 1.0) != 1.0 else "")
        + "; output centred and"
        f" scaled to the text-embedding norm x {m['proj_norm']}). Curriculum over the first {m['focus_frac']:.0%}"
        " of steps: the LM sees the object patches plus a random share of background patches growing from none"
        f" to all; after it, {m['drop_prob']:.0%} of batches keep a random {m['drop_min']:.0%}-100% of the"
        " visual tokens (token dropout), the rest all 576.",
        f"- Extra questions per image drawn by qtype weight {json.dumps(m['qtype_weights'])}"
        + (
            f"; for the first {m['phase1_frac']:.0%} of stage-2 steps {json.dumps(m['phase1_qtype_weights'])} instead"
            if m.get("phase1_frac") and m.get("phase1_qtype_weights")
            else ""
        )
        + (
            f"; \"left of\" / \"above\" weighted {m['position_rel_bias']} among the yes/no position questions"
            if m.get("position_rel_bias", 0.5) != 0.5
            else ""
        )
        + ' (\"side\" / \"relside\" are training-only questions answered with the side itself).',
        f"- Sizes: {json.dumps(m['sizes'])}; {m['n_params']:,} parameters; safetensors {m['safetensors_bytes'] / 1e6:.2f} MB.",
        f"- Device: {m['device']}; wall time {m['wall_time_s']:.0f} s (stage 1 {m['stage1_time_s']:.0f} s, stage 2"
        f" {m['stage2_time_s']:.0f} s, the rest evaluation); torch {m['torch']}, transformers {m['transformers']}.",
        "",
        f"## SynthVQA test accuracy ({m['eval_n']} questions, unpruned, harness inference format)",
        "",
        "| overall | " + " | ".join(QTYPES) + " |",
        "|---" * (len(QTYPES) + 1) + "|",
        f"| {acc['overall']:.3f} | " + " | ".join(f"{acc[q]:.3f}" for q in QTYPES) + " |",
        "",
        "## CLS attention",
        "",
        f"At the feature layer (CLIP layer -2, heads averaged), {m['cls_attention_object_mass']:.3f} of the CLS",
        "token's attention over the 576 patches falls on patches that overlap an object's bbox (mean over test",
        f"images; {m['cls_attention_object_mass_raw']:.3f} of its whole row, CLS self-attention included).",
        "",
        "## Reference pruning (training script's own evaluation; LM sees the kept tokens at contiguous positions)",
        "",
        "| setting | tokens | overall | " + " | ".join(QTYPES) + " |",
        "|---|---|---" + "|---" * len(QTYPES) + "|",
    ]
    for k, v in m["pruned"].items():
        lines.append(
            f"| {k} | {m['pruned_tokens'].get(k, '')} | {v['overall']:.3f} | " + " | ".join(f"{v[q]:.3f}" for q in QTYPES) + " |"
        )
    lines += [
        "",
        f"Random 10% keep (ratio 0.9) loses {m['random_r0.9_gap_points']:.1f} accuracy points against unpruned.",
        "",
        "Numbers are also in `train_metrics.json`.",
        "",
    ]
    (out_dir / "MODEL_CARD.md").write_text("\n".join(lines))


def _stage2_args(args) -> dict:
    keys = (
        "stage2_steps", "stage2_batch_size", "questions_per_image", "qtype_weights", "lr2", "warmup", "head_gain", "coord_gain",
        "proj_norm", "drop_prob", "drop_min", "focus_frac", "embed_std", "phase1_qtype_weights", "phase1_frac",
        "position_rel_bias",
    )
    return _stage1_args(args) | {k: getattr(args, k) for k in keys} | {"sizes": {**DEFAULT_SIZES, **args.sizes}}


def _stage1_args(args) -> dict:
    keys = ("seed", "image_size", "stage1_steps", "batch_size", "lr1", "warmup", "dense_weight", "attn_weight", "pos_init_scale")
    sizes = {**DEFAULT_SIZES, **args.sizes}
    return {k: getattr(args, k) for k in keys} | {"vision_sizes": {k: v for k, v in sizes.items() if k.startswith("vision")}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--image-size", type=int, default=336, help="below 336: CPU proxy (smaller scenes), not shippable")
    ap.add_argument("--stage1-steps", type=int, default=3000)
    ap.add_argument("--stage2-steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=128, help="images per stage-1 batch")
    ap.add_argument("--stage2-batch-size", type=int, default=32, help="images per stage-2 batch")
    ap.add_argument("--questions-per-image", type=int, default=4)
    ap.add_argument(
        "--qtype-weights",
        type=json.loads,
        default={},
        help='JSON weights of the question types for the extra questions per image, e.g. {"color": 0.5} (default 1 '
        'each); the training-only "side" / "relside" (left / right / above / below as the answer) are off unless '
        "given a weight",
    )
    ap.add_argument(
        "--phase1-qtype-weights",
        type=json.loads,
        default={},
        help="JSON qtype weights used instead of --qtype-weights for the first --phase1-frac of stage 2 "
        "(e.g. side questions only, before the yes/no position form)",
    )
    ap.add_argument("--phase1-frac", type=float, default=0.0, help="stage-2 share of the --phase1-qtype-weights phase")
    ap.add_argument(
        "--position-rel-bias",
        type=float,
        default=0.5,
        help='probability weight of "left of" / "above" among the extra yes/no position questions (0.5: uniform)',
    )
    ap.add_argument("--lr1", type=float, default=2e-3)
    ap.add_argument("--lr2", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--dense-weight", type=float, default=1.0)
    ap.add_argument("--attn-weight", type=float, default=0.3)
    ap.add_argument("--pos-init-scale", type=float, default=1.0, help="2-D sincos init of the tower's position embeddings (0: random)")
    ap.add_argument("--head-gain", type=float, default=1.0, help="scale of the dense-head rows folded into the projector")
    ap.add_argument("--coord-gain", type=float, default=1.0, help="extra scale of the x / y rows among the folded dense-head rows")
    ap.add_argument("--proj-norm", type=float, default=1.0, help="projected token norm / text embedding norm at init")
    ap.add_argument("--drop-prob", type=float, default=0.3)
    ap.add_argument("--drop-min", type=float, default=0.1)
    ap.add_argument("--focus-frac", type=float, default=0.3, help="stage-2 share of the object-focus curriculum")
    ap.add_argument("--embed-std", type=float, default=1.0, help="init std of the LM's input embeddings")
    ap.add_argument("--save-every", type=int, default=1000, help="stage-2 checkpoint interval (0: only at the end)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument(
        "--stage1-ckpt",
        type=Path,
        default=None,
        help="stage-1 checkpoint: loaded (stage 1 skipped) if it exists and matches the stage-1 arguments, else written",
    )
    ap.add_argument(
        "--stage2-ckpt",
        type=Path,
        default=None,
        help="stage-2 state (weights, optimiser, step): resumed from if it exists and matches the arguments; "
        "written when --max-seconds stops training",
    )
    ap.add_argument("--max-seconds", type=float, default=0, help="stop stage 2 after this wall time (0: never), saving --stage2-ckpt")
    ap.add_argument("--eval-n", type=int, default=TEST_SIZE)
    ap.add_argument("--eval-bs", type=int, default=None)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--sizes", type=json.loads, default={}, help="JSON overrides of DEFAULT_SIZES")
    args = ap.parse_args(argv)
    if not 0.0 <= args.phase1_frac <= 1.0:
        ap.error(f"--phase1-frac must be in [0, 1], got {args.phase1_frac}")
    if bool(args.phase1_frac) != bool(args.phase1_qtype_weights):
        ap.error("--phase1-qtype-weights and --phase1-frac > 0 go together (one without the other does nothing)")
    if not 0.0 <= args.position_rel_bias <= 1.0:
        ap.error(f"--position-rel-bias is a probability weight in [0, 1], got {args.position_rel_bias}")
    for flag, weights in (("--qtype-weights", args.qtype_weights), ("--phase1-qtype-weights", args.phase1_qtype_weights)):
        unknown = sorted(set(weights) - set(QTYPES) - set(AUX_QTYPES))
        if unknown or any(w < 0 for w in weights.values()):
            ap.error(f"{flag}: keys must be among {[*QTYPES, *AUX_QTYPES]} with weights >= 0, got {weights}")
        if weights and not any(weights.get(t, 1.0) > 0 for t in QTYPES) and not aux_questions_on(weights):
            ap.error(f"{flag}: every question type has weight 0, got {weights}")
    if args.image_size != 336:
        set_image_size(args.image_size)
    if args.workers is None:
        args.workers = max(0, min(15, (os.cpu_count() or 1) - 1))
    device = torch.device(args.device)
    if args.eval_bs is None:
        args.eval_bs = 100 if device.type == "cuda" else 8
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t_start = T_START

    def log(msg):
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    command = "python scripts/train_tiny_llava.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    sizes = {**DEFAULT_SIZES, **args.sizes}
    # "or" joins the vocabulary only when the side questions are on (see TRAINING_WORDS)
    extra_words = tuple(_tiny.TRAINING_WORDS) if aux_questions_on(args.qtype_weights, args.phase1_qtype_weights) else ()
    model = build_model(sizes, seed=args.seed, extra_words=extra_words).to(device)
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight.normal_(0.0, args.embed_std)
    if args.pos_init_scale > 0:
        init_vision_positions(model, args.pos_init_scale)
    heads = VisionHeads(sizes["vision_hidden"]).to(device)
    processor = build_processor(_tiny.build_tokenizer(extra_words=extra_words))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model {n_params:,} params; device {device}; workers {args.workers}; args {vars(args)}")
    args.out.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(args.out)

    def save(what):
        t = time.time()
        model.save_pretrained(args.out)
        log(f"saved {what} to {args.out} ({time.time() - t:.1f}s)")

    ck = args.stage1_ckpt
    if ck is not None and ck.exists():
        # stage 1 depends only on the seed and the stage-1 arguments: reuse it when trying stage-2 settings
        state = torch.load(ck, map_location=device)
        if state["stage1_args"] != _stage1_args(args):
            raise SystemExit(f"{ck} was trained with {state['stage1_args']}, not {_stage1_args(args)}")
        model.model.vision_tower.load_state_dict(state["vision_tower"])
        heads.load_state_dict(state["heads"])
        t1, st1 = state["time_s"], state["final"]
        log(f"stage 1 loaded from {ck} (trained in {t1:.0f}s)")
    else:
        t1, st1 = train_stage1(args, model, heads, device, log)
        if ck is not None:
            ck.parent.mkdir(parents=True, exist_ok=True)
            state = {
                "vision_tower": model.model.vision_tower.state_dict(),
                "heads": heads.state_dict(),
                "stage1_args": _stage1_args(args),
                "time_s": t1,
                "final": st1,
            }
            torch.save(state, ck)
            log(f"stage 1 saved to {ck}")
    init_projector(args, model, heads, device, log)
    t2, train_acc, t2_earlier_calls = train_stage2(args, model, processor, device, log, save)
    model.eval()
    save("final weights")
    # a resumed stage 2 ran partly in earlier processes: count their stage-2 time too
    train_time = time.time() - t_start + t2_earlier_calls

    acc, pruned, ntok, mass, mass_raw, eval_n = evaluate(args, args.out, device, log)
    import transformers

    st = args.out / "model.safetensors"
    metrics = {
        "command": command,
        "seed": args.seed,
        "image_size": args.image_size,
        "stage1_steps": args.stage1_steps,
        "stage2_steps": args.stage2_steps,
        "batch_size": args.batch_size,
        "stage2_batch_size": args.stage2_batch_size,
        "questions_per_image": args.questions_per_image,
        "stage1_ckpt": str(args.stage1_ckpt) if args.stage1_ckpt else None,
        "qtype_weights": args.qtype_weights,
        "phase1_qtype_weights": args.phase1_qtype_weights,
        "phase1_frac": args.phase1_frac,
        "position_rel_bias": args.position_rel_bias,
        "lr1": args.lr1,
        "lr2": args.lr2,
        "warmup": args.warmup,
        "dense_weight": args.dense_weight,
        "attn_weight": args.attn_weight,
        "head_gain": args.head_gain,
        "coord_gain": args.coord_gain,
        "pos_init_scale": args.pos_init_scale,
        "proj_norm": args.proj_norm,
        "drop_prob": args.drop_prob,
        "drop_min": args.drop_min,
        "focus_frac": args.focus_frac,
        "embed_std": args.embed_std,
        "generator_version": GENERATOR_VERSION,
        "sizes": sizes,
        "n_params": n_params,
        "safetensors_bytes": st.stat().st_size if st.exists() else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "stage1_time_s": t1,
        "stage2_time_s": t2,
        "train_time_s": train_time,
        "wall_time_s": time.time() - t_start + t2_earlier_calls,
        "stage2_ckpt": str(args.stage2_ckpt) if args.stage2_ckpt else None,
        "stage2_resumed_after_s": t2_earlier_calls or None,
        "stage1_final": st1,
        "stage2_final_train_acc": train_acc,
        "eval_n": eval_n,
        "accuracy": acc,
        "cls_attention_object_mass": mass,
        "cls_attention_object_mass_raw": mass_raw,
        "pruned": pruned,
        "pruned_tokens": ntok,
        "random_r0.9_gap_points": 100 * (acc["overall"] - pruned["random_r0.9"]["overall"]),
        "example": _card_example(),
    }
    (args.out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_card(args.out, metrics)

    print("\n==== summary ====")
    print(f"{'setting':<14} " + " ".join(f"{k:>8}" for k in ["overall", *QTYPES]))
    for name, r in [("unpruned", acc), *pruned.items()]:
        print(f"{name:<14} " + " ".join(f"{r[k]:8.3f}" for k in ["overall", *QTYPES]))
    print(f"CLS attention mass on object patches (layer -2): {mass:.3f} (raw {mass_raw:.3f})")
    print(f"random 10% gap: {metrics['random_r0.9_gap_points']:.1f} points; wall {metrics['wall_time_s']:.0f}s")


if __name__ == "__main__":
    main()
