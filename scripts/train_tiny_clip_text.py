#!/usr/bin/env python
"""Train the embedded tiny model's CLIP text side (``bench/assets/tiny-llava-synth/clip-text``) for CDPruner.

CDPruner scores each visual token against the question in CLIP's joint space: ``visual_projection`` of the
feature layer's (-2) patch tokens after ``post_layernorm`` against the text tower's ``text_embeds``. The tiny
LLaVA has only a vision tower, so this script builds the rest of a CLIP around it (``bench.tiny_clip_text``):
the vision tower is copied from the tiny LLaVA and frozen; a 2-layer text tower, ``text_projection`` and
``visual_projection`` are trained contrastively (InfoNCE over the batch, both directions) on SynthVQA training
images and their questions. An image's score for a question is a soft maximum over its patches of the cosine
between the patch's joint-space embedding and the question's, so that the patches showing what a question is
about become the ones most similar to it (the per-token quantity CDPruner reads). Questions are tokenised as
CDPruner tokenises them (no truncation, zero-padded to 77). CPU, seeded, a few minutes:

    python scripts/train_tiny_clip_text.py --out bench/assets/tiny-llava-synth/clip-text

writes ``config.json``, ``model.safetensors``, the tokenizer, ``train_metrics.json`` and ``MODEL_CARD.md``.
The tiny LLaVA's own files (and their pinned sha256) are read, never written.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthvqa.generator import make_example, scene_questions  # noqa: E402
from bench.tiny_clip_text import CLIP_TEXT_PATH, TEXT_SIZES, build_clip, build_clip_tokenizer  # noqa: E402
from bench.tiny_llava import TINY_LLAVA_PATH, object_patch_mask, pixel_tensor  # noqa: E402


def questions_of(ex) -> list[str]:
    """Questions that describe something in the image (an absent object's "is there ...?" does not)."""
    out = [q for q, a, t in scene_questions(ex["objects"]) if not (t == "exist" and a == "no")]
    if not (ex["qtype"] == "exist" and ex["answer"] == "no"):
        out.append(ex["question"])
    return sorted(set(out))


@torch.no_grad()
def patch_features(llava, images, batch: int = 32) -> torch.Tensor:
    """``(n, N, D_vis)`` ``post_layernorm(h[-2][:, 1:])`` of the frozen tower (what CDPruner projects)."""
    vt = llava.model.vision_tower
    vm = getattr(vt, "vision_model", vt)
    out = []
    for i in range(0, len(images), batch):
        h = vt(pixel_tensor(images[i : i + batch]), output_hidden_states=True).hidden_states[llava.config.vision_feature_layer]
        out.append(vm.post_layernorm(h[:, 1:]).float())
    return torch.cat(out)


def tokenize(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CDPruner's tokenisation (no truncation, zero-padded to 77); questions here fit one chunk."""
    ids = torch.zeros(len(texts), 77, dtype=torch.long)
    mask = torch.zeros(len(texts), 77, dtype=torch.long)
    for i, t in enumerate(texts):
        x = tok(text=t)["input_ids"]
        assert len(x) <= 77, t
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return ids, mask


def text_features(clip, ids, mask) -> torch.Tensor:
    out = clip.get_text_features(input_ids=ids, attention_mask=mask)
    return getattr(out, "pooler_output", out) if not isinstance(out, torch.Tensor) else out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(CLIP_TEXT_PATH))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=1024, help="SynthVQA training images (features precomputed once)")
    ap.add_argument("--eval-images", type=int, default=200, help="SynthVQA test images for the card's metrics")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--tau", type=float, default=0.05, help="temperature of the soft maximum over patches")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()

    from transformers import LlavaForConditionalGeneration

    llava = LlavaForConditionalGeneration.from_pretrained(TINY_LLAVA_PATH, dtype=torch.float32).eval()
    tok = build_clip_tokenizer()
    clip = build_clip(llava.config.vision_config, len(tok), seed=args.seed)
    clip.vision_model.load_state_dict(llava.model.vision_tower.state_dict())
    clip.vision_model.requires_grad_(False)

    train = [make_example("train", args.seed, i) for i in range(args.images)]
    test = [make_example("test", 0, i) for i in range(args.eval_images)]
    feats = patch_features(llava, [e["image"] for e in train])
    test_feats = patch_features(llava, [e["image"] for e in test])
    qs = [questions_of(e) for e in train]
    t_feat = time.time() - t0

    params = [p for n, p in clip.named_parameters() if p.requires_grad and not n.startswith("vision_model")]
    scale = torch.nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))
    opt = torch.optim.AdamW([{"params": params}, {"params": [scale], "weight_decay": 0.0}], lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    rng = np.random.default_rng(args.seed)
    clip.train()
    log = []
    for step in range(args.steps):
        pick = rng.choice(len(train), size=args.batch, replace=False)
        texts = [qs[i][rng.integers(len(qs[i]))] for i in pick]
        ids, mask = tokenize(tok, texts)
        t = F.normalize(text_features(clip, ids, mask), dim=-1)
        p = F.normalize(clip.visual_projection(feats[pick]), dim=-1)
        sim = torch.einsum("inc,tc->itn", p, t)
        s = args.tau * torch.logsumexp(sim / args.tau, dim=-1)  # (img, txt)
        logits = scale.exp().clamp(max=100) * s
        target = torch.arange(args.batch)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": round(float(loss), 4)})
            print(log[-1], flush=True)
    clip.eval()

    # held-out metrics: retrieval among the test images, and where the question's most similar patches fall
    with torch.no_grad():
        texts = [e["question"] for e in test]
        ids, mask = tokenize(tok, texts)
        t = F.normalize(text_features(clip, ids, mask), dim=-1)
        p = F.normalize(clip.visual_projection(test_feats), dim=-1)
        sim = torch.einsum("inc,tc->itn", p, t)
        s = args.tau * torch.logsumexp(sim / args.tau, dim=-1)
        r1 = float((s.argmax(dim=0) == torch.arange(len(test))).float().mean())
        on_obj, base = [], []
        for i, e in enumerate(test):
            m = torch.from_numpy(object_patch_mask(e["objects"]))
            top = sim[i, i].topk(32).indices
            on_obj.append(float(m[top].float().mean()))
            base.append(float(m.float().mean()))
    metrics = {
        "text_to_image_recall_at_1": round(r1, 4), "chance": round(1 / len(test), 4),
        "top32_similar_patches_on_objects": round(float(np.mean(on_obj)), 4), "object_patch_share": round(float(np.mean(base)), 4),
        "eval_images": len(test), "train_images": len(train), "steps": args.steps, "final_loss": log[-1]["loss"],
        "seconds": round(time.time() - t0, 1), "feature_seconds": round(t_feat, 1), "log": log,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clip.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    import transformers

    cmd = "python scripts/train_tiny_clip_text.py " + shlex.join(sys.argv[1:])
    (out / "MODEL_CARD.md").write_text(f"""# tiny-llava-synth / clip-text

CLIP text side of the embedded tiny LLaVA, for CDPruner (`model.text_tower` of `conf/model/tiny_llava_synth.yaml`).
A `CLIPModel` checkpoint in the layout of `openai/clip-vit-large-patch14-336`: `vision_model` is a frozen copy of the
tiny LLaVA's vision tower; `text_model` ({TEXT_SIZES['layers']} layers, width {TEXT_SIZES['hidden']}), `text_projection`
and `visual_projection` (joint width {TEXT_SIZES['projection']}) are trained; CLIP byte-level BPE tokenizer over
SynthVQA's words (`bench.tiny_clip_text`).

## Training
- Command: `{cmd}` (seed {args.seed}; CPU, {args.threads} threads; torch {torch.__version__}, transformers {transformers.__version__}, {platform.machine()}).
- Data: the first {len(train)} SynthVQA training images; texts are their questions (every unambiguous scene question,
  absent-object existence questions excluded), tokenised as CDPruner does (no truncation, zero-padded to 77).
- Objective: InfoNCE over {args.batch} image/question pairs per step, both directions, learnable logit scale; an
  image's score for a question is `{args.tau} * logsumexp(cos(patch, question) / {args.tau})` over its 576 patches,
  the patches being `visual_projection(post_layernorm(h[-2][:, 1:]))` of the frozen tower (what CDPruner reads).
  AdamW lr {args.lr}, one-cycle schedule, {args.steps} steps; {metrics['seconds']} s.

## Held-out metrics (first {len(test)} SynthVQA test images, their own question)
| text->image recall@1 | chance | top-32 question-similar patches on objects | object patch share |
|---|---|---|---|
| {metrics['text_to_image_recall_at_1']} | {metrics['chance']} | {metrics['top32_similar_patches_on_objects']} | {metrics['object_patch_share']} |

CDPruner negates this similarity (its official relevance is `-cos`), so it favours the patches *least* similar to the question.
""")
    print(json.dumps({k: v for k, v in metrics.items() if k != "log"}))


if __name__ == "__main__":
    main()
