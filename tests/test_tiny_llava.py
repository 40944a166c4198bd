"""The embedded tiny LLaVA: tokenizer/processor format, shipped assets, training-script smoke run, model card."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.synthvqa.generator import POST_PROMPT, VOCAB, generate_examples, words
from bench.models.llava import chat_prompt
from bench.tiny_llava import TINY_LLAVA_PATH, build_processor, build_tokenizer, prompt_text

ROOT = Path(__file__).resolve().parents[1]


def test_tokenizer_covers_vocab():
    tok = build_tokenizer()
    unk = tok.unk_token_id
    for w in VOCAB:
        ids = tok(w, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != unk, w
    ids = tok("USER: what color is the star?\nAnswer the question using a single word. ASSISTANT: red")["input_ids"]
    assert ids[0] == tok.bos_token_id and unk not in ids
    assert tok.decode(tok(" red", add_special_tokens=False)["input_ids"] + [tok.eos_token_id], skip_special_tokens=True) == "red"


def test_chat_template_and_576_image_tokens():
    proc = build_processor()
    q = "what color is the star?" + POST_PROMPT
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt == f"USER: <image>\n{q} ASSISTANT:" == prompt_text("what color is the star?")
    ex = generate_examples("test", 2, 0)
    proc.tokenizer.padding_side = "left"
    inputs = proc(images=[e["image"] for e in ex], text=[prompt, prompt_text(ex[1]["question"])], return_tensors="pt", padding=True)
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert (inputs["input_ids"] == image_id).sum(1).tolist() == [576, 576]
    assert inputs["pixel_values"].shape == (2, 3, 336, 336)


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(TINY_LLAVA_PATH).eval(), AutoProcessor.from_pretrained(TINY_LLAVA_PATH)


def test_shipped_size():
    assert (TINY_LLAVA_PATH / "model.safetensors").stat().st_size <= 30 * 1024 * 1024


def test_shipped_assets_answer(shipped):
    model, proc = shipped
    cfg = model.config
    assert cfg.vision_config.image_size == 336 and cfg.vision_config.patch_size == 14
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    ex = generate_examples("test", 4, 0)
    proc.tokenizer.padding_side = "left"
    prompts = [chat_prompt(proc, e["question"] + POST_PROMPT) for e in ex]
    inputs = proc(images=[e["image"] for e in ex], text=prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    texts = proc.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    for t in texts:
        assert t.strip() and set(words(t)) <= set(VOCAB), t


@pytest.mark.slow
def test_training_script_cpu_smoke(tmp_path):
    out = tmp_path / "tl"
    cmd = [sys.executable, str(ROOT / "scripts" / "train_tiny_llava.py"), "--stage1-steps", "2", "--stage2-steps", "2",
           "--device", "cpu", "--out", str(out), "--batch-size", "2", "--stage2-batch-size", "2",
           "--questions-per-image", "4", "--qtype-weights", '{"color": 0.5, "count": 2, "position": 3, "side": 1, "relside": 1}',
           "--phase1-qtype-weights", '{"position": 0, "side": 2}', "--phase1-frac", "0.5", "--position-rel-bias", "0.75", "--eval-n", "5",
           "--stage1-ckpt", str(tmp_path / "s1.pt"), "--workers", "0", "--log-every", "1"]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=300)
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(out)
    proc = AutoProcessor.from_pretrained(out)
    ex = generate_examples("test", 1, 0)[0]
    inputs = proc(images=[ex["image"]], text=[prompt_text(ex["question"])], return_tensors="pt")
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    m = json.loads((out / "train_metrics.json").read_text())
    assert m["stage1_steps"] == 2 and m["stage2_steps"] == 2 and (out / "MODEL_CARD.md").exists()
    assert m["qtype_weights"] == {"color": 0.5, "count": 2, "position": 3, "side": 1, "relside": 1}
    assert m["phase1_qtype_weights"] == {"position": 0, "side": 2} and m["position_rel_bias"] == 0.75
    s1 = torch.load(tmp_path / "s1.pt")  # reusable by a later run with the same stage-1 arguments
    assert s1["stage1_args"]["stage1_steps"] == 2 and "vision_tower" in s1 and "heads" in s1
    # a wall-time stop saves stage 2's state; the same command then resumes from it and finishes
    ck = tmp_path / "s2.pt"
    r = subprocess.run(cmd + ["--stage2-ckpt", str(ck), "--max-seconds", "0.001"], cwd=ROOT, timeout=300,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "rerun to resume" in r.stderr and ck.exists()
    assert torch.load(ck, weights_only=False)["step"] == 0
    r = subprocess.run(cmd + ["--stage2-ckpt", str(ck)], cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stage 2 resumed" in r.stdout
    assert json.loads((out / "train_metrics.json").read_text())["stage2_resumed_after_s"] is not None


def _train_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_tiny_llava", ROOT / "scripts" / "train_tiny_llava.py")
    tt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tt)
    return tt


def test_side_questions_match_geometry():
    """The training-only side questions answer with the side itself, consistent with the object centres, and
    only use words the tokenizer knows (the benchmark's words plus "or")."""
    from bench.synthvqa.generator import IMAGE_SIZE, make_example
    from bench.tiny_llava import TRAINING_WORDS

    tt = _train_module()
    tok = build_tokenizer(extra_words=TRAINING_WORDS)
    n = {"side": 0, "relside": 0}
    for i in range(40):
        objs = make_example("train", 0, i)["objects"]
        by_name = {f"{o['color']} {o['shape']}": o for o in objs}
        for q, a, t in tt.side_questions(objs):
            n[t] += 1
            m = re.fullmatch(r"is the (\w+ \w+) (left or right|above or below)(?: of)?(?: the (\w+ \w+))?\?", q)
            assert m and (m.group(3) is None) == (t == "side"), q
            axis = 0 if m.group(2) == "left or right" else 1
            ca = tt._centre(by_name[m.group(1)])[axis]
            cb = IMAGE_SIZE / 2 if t == "side" else tt._centre(by_name[m.group(3)])[axis]
            assert a == (("left", "right") if axis == 0 else ("above", "below"))[int(ca > cb)], (q, a)
            assert set(words(q)) <= set(VOCAB) | set(TRAINING_WORDS)
            assert tok.unk_token_id not in tok(q)["input_ids"]
    assert n["side"] > 20 and n["relside"] > 20
    # without the side questions the vocabulary (hence the seeded initial weights) is the benchmark's alone
    assert "or" not in build_tokenizer().get_vocab() and "or" not in set(VOCAB)


def test_shared_prefix_forward_equals_full_sequences():
    """Training computes each image prefix once and repeats its cache over the image's questions: the suffix
    hidden states and labels must equal the full-sequence forward's (right padding, causal, fp32)."""
    tt = _train_module()
    from bench.tiny_llava import build_model, build_processor

    model, proc = build_model(seed=3).eval(), build_processor()
    ids_builder = tt.PromptIds(proc.tokenizer)
    b, q, k = 2, 3, 40
    feats = torch.randn(b, k, model.config.text_config.hidden_size)
    qs = ["what color is the star?", "how many circles are there?", "is there a red cross?"] * b
    ans = ["red", "3", "no", "blue", "1", "yes"]
    with torch.no_grad():
        h, labels = tt.shared_prefix_forward(model, ids_builder, feats, qs, ans, "cpu")
        ids, _, full_labels = ids_builder.batch(qs, ans, k, "cpu", pad_side="right")
        emb = tt.embed_with_image(model, ids, feats.repeat_interleave(q, dim=0))
        h_full = model.model.language_model(inputs_embeds=emb).last_hidden_state
    p = len(ids_builder.prefix(k))
    assert h.shape[1] == ids.shape[1] - p
    torch.testing.assert_close(h, h_full[:, p:], rtol=1e-4, atol=1e-4)
    assert torch.equal(labels, full_labels[:, p:]) and (full_labels[:, :p] == -100).all()


def _card_and_metrics():
    card = (TINY_LLAVA_PATH / "MODEL_CARD.md").read_text()
    return card, json.loads((TINY_LLAVA_PATH / "train_metrics.json").read_text())


def test_model_card_matches_metrics():
    card, m = _card_and_metrics()
    acc = m["accuracy"]
    row = f"| {acc['overall']:.3f} | " + " | ".join(f"{acc[q]:.3f}" for q in ("color", "shape", "count", "position", "exist")) + " |"
    assert row in card
    assert f"{m['cls_attention_object_mass']:.3f}" in card
    assert f"generator version {m['generator_version']}" in card
    from bench.synthvqa.generator import GENERATOR_VERSION

    assert m["generator_version"] == GENERATOR_VERSION


# Issue 3's targets on the shipped weights' own evaluation (train_metrics.json): >= 0.90 overall, >= 15 points
# lost at random 10% keep, CLS mass >= 0.70, a monotone random curve; per-type floors catch a retrain that
# regresses one question type.
def test_model_card_numbers_hold():
    _, m = _card_and_metrics()
    assert m["cls_attention_object_mass"] >= 0.70
    assert m["accuracy"]["overall"] >= 0.90
    assert min(m["accuracy"][q] for q in ("color", "shape", "exist")) >= 0.95
    assert min(m["accuracy"][q] for q in ("count", "position")) >= 0.85
    assert m["accuracy"]["overall"] - m["pruned"]["random_r0.9"]["overall"] >= 0.15
    rnd = [m["pruned"][f"random_r{r}"]["overall"] for r in (0.5, 0.75, 0.9)]
    assert m["accuracy"]["overall"] >= rnd[0] >= rnd[1] >= rnd[2]


def test_train_stream_phases_and_relation_bias():
    """Phase-1 weights apply below the switch index only; the relation bias skews the extra yes/no position
    questions toward "left of" / "above" without removing the others."""
    tt = _train_module()
    p1 = {"color": 0, "shape": 0, "count": 0, "exist": 0, "position": 0, "side": 1}
    stream = tt.TrainStream(0, 0, questions_per_image=16, image_size=336, qtype_weights={"position": 1, "color": 0, "shape": 0, "count": 0, "exist": 0},
                            phase1_weights=p1, phase1_end=3, rel_bias=0.9)
    it = iter(stream)
    items = [next(it) for _ in range(40)]
    for k, item in enumerate(items):
        extra = item["qtype"][1:]  # the first question is the test-distribution one
        assert set(extra) <= ({"side"} if k < 3 else {"position"}), (k, extra)
    pos = [q for item in items[3:] for q, t in zip(item["question"][1:], item["qtype"][1:]) if t == "position"]
    skewed = sum((" left of " in q or " above " in q) for q in pos) / len(pos)
    assert 0.8 < skewed < 0.97, skewed


def test_model_card_harness_table_matches_records():
    """The card's harness table is the committed full-split records of the shipped weights (the default run in
    results/runs, the pool / random runs in results/tiny_llava_training/p10_harness), made with these weights."""
    from bench.models.llava import local_fingerprint

    fp = local_fingerprint(str(TINY_LLAVA_PATH))
    files = [*(ROOT / "results" / "runs").glob("*/record.json"), *(ROOT / "results" / "tiny_llava_training" / "p10_harness").glob("*.json")]
    recs = {}
    for f in files:
        r = json.loads(f.read_text())
        if r["model"] == "tiny_llava_synth" and r.get("limit") is None:
            assert r["provenance"]["model_fingerprint"] == fp, f
            recs[(r["method"], r["ratio"])] = r["metrics"]
    card, _ = _card_and_metrics()
    qtypes = ("color", "shape", "count", "position", "exist")
    for (method, ratio), m in [(("none", 0.0), recs[("none", 0.0)])] + [((k, r), recs[(k, r)]) for k in ("pool", "random") for r in (0.5, 0.75, 0.9)]:
        name = "`method=none` (default run)" if method == "none" else f"`method={method} ratio={ratio}`"
        row = f"| {name} | {m['exact_match']['value']:.3f} | " + " | ".join(f"{m['acc_' + q]['value']:.3f}" for q in qtypes) + " |"
        assert row in card, row
    assert recs[("none", 0.0)]["exact_match"]["value"] - recs[("random", 0.9)]["exact_match"]["value"] >= 0.15
    for k in ("pool", "random"):
        accs = [recs[("none", 0.0)]] + [recs[(k, r)] for r in (0.5, 0.75, 0.9)]
        assert all(a["exact_match"]["value"] >= b["exact_match"]["value"] for a, b in zip(accs, accs[1:])), k


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--phase1-frac", "1.5", "--phase1-qtype-weights", '{"side": 1}'], "--phase1-frac must be in [0, 1]"),
        (["--phase1-frac", "0.4"], "go together"),
        (["--position-rel-bias", "2"], "--position-rel-bias is a probability weight"),
        (["--qtype-weights", '{"colour": 1}'], "keys must be among"),
        (["--qtype-weights", '{"color": 0, "shape": 0, "count": 0, "position": 0, "exist": 0}'], "every question type has weight 0"),
    ],
)
def test_training_script_refuses_bad_question_mix(argv, message, tmp_path, capsys):
    tt = _train_module()
    with pytest.raises(SystemExit) as e:
        tt.main(["--out", str(tmp_path / "o"), "--device", "cpu", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_model_card_prompt_answers_its_example():
    """The card's prompt is the format the model was trained with: filled with the card's example question
    (and with the first test questions), the model answers correctly."""
    import re

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from bench.synthvqa.data import load_test
    from bench.tiny_llava import first_word

    card = (TINY_LLAVA_PATH / "MODEL_CARD.md").read_text()
    template = re.search(r"prompt `(USER: <image>[^`]*ASSISTANT:)`", card).group(1).replace("\\n", "\n")
    question, answer = re.search(r"`\{question\}` = `([^`]+)`, answer `([^`]+)`", card).groups()
    docs = load_test()[:12]
    assert (docs[0]["question"], docs[0]["answer"]) == (question, answer)
    model = LlavaForConditionalGeneration.from_pretrained(TINY_LLAVA_PATH).eval()
    proc = AutoProcessor.from_pretrained(TINY_LLAVA_PATH)
    right = []
    for d in docs:
        inputs = proc(images=[d["image"]], text=[template.replace("{question}", d["question"])], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        right.append(first_word(proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)) == d["answer"])
    assert right[0], "the card's example question is answered wrongly with the card's prompt"
    assert sum(right) >= 10, f"only {sum(right)}/12 test questions answered right with the card's prompt"
