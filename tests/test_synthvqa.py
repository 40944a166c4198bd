"""SynthVQA: generator determinism and validity, the cached parquet, and the lmms-eval task end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from bench.synthvqa.generator import (
    GENERATOR_VERSION,
    MIN_SEP,
    QTYPES,
    SHAPES,
    VOCAB,
    generate_examples,
    iter_train,
    make_example,
    words,
)


@pytest.fixture(scope="module")
def examples():
    return generate_examples("test", 100, 0)


def test_deterministic(examples):
    again = generate_examples("test", 10, 0)
    for a, b in zip(examples[:10], again):
        assert a["question"] == b["question"] and a["answer"] == b["answer"] and a["objects"] == b["objects"]
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))


def test_train_disjoint_from_test(examples):
    train = [next(iter_train(0, start=i)) for i in range(10)]
    test_imgs = {np.asarray(e["image"]).tobytes() for e in examples[:10]}
    assert not any(np.asarray(t["image"]).tobytes() in test_imgs for t in train)
    assert all(t["question_id"] != e["question_id"] for t in train for e in examples)


def test_fields_and_balance(examples):
    for e in examples:
        assert e["image"].size == (336, 336) and e["image"].mode == "RGB"
        assert e["answer"] == e["answer"].lower() and " " not in e["answer"]
        for o in e["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= 336 and 0 <= y0 < y1 <= 336
    counts = {q: sum(e["qtype"] == q for e in examples) for q in QTYPES}
    assert set(counts.values()) == {20}


def test_vocab_covers_everything(examples):
    from bench.synthvqa.generator import POST_PROMPT

    vocab = set(VOCAB)
    for e in examples:
        assert set(words(e["question"] + POST_PROMPT)) <= vocab
        assert set(words(e["answer"])) <= vocab


def _center(o):
    x0, y0, x1, y1 = o["bbox"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def test_answers_are_correct_and_unambiguous(examples):
    for e in examples:
        objs, q, a = e["objects"], e["question"], e["answer"]
        if e["qtype"] == "color":
            s = re.match(r"what color is the (\w+)\?", q).group(1)
            match = [o for o in objs if o["shape"] == s]
            assert len(match) == 1 and match[0]["color"] == a
        elif e["qtype"] == "shape":
            c = re.match(r"what shape is the (\w+) object\?", q).group(1)
            match = [o for o in objs if o["color"] == c]
            assert len(match) == 1 and match[0]["shape"] == a
        elif e["qtype"] == "count":
            plural = re.match(r"how many (\w+) are there\?", q).group(1)
            s = [s for s in SHAPES if plural.startswith(s)][0]
            assert str(sum(o["shape"] == s for o in objs)) == a
        elif e["qtype"] == "exist":
            c, s = re.match(r"is there a (\w+) (\w+)\?", q).groups()
            assert ("yes" if any(o["shape"] == s and o["color"] == c for o in objs) else "no") == a
        else:
            c1, s1, rel, c2, s2 = re.match(r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", q).groups()
            oa = [o for o in objs if (o["color"], o["shape"]) == (c1, s1)]
            ob = [o for o in objs if (o["color"], o["shape"]) == (c2, s2)]
            assert len(oa) == 1 and len(ob) == 1
            (ax, ay), (bx, by) = _center(oa[0]), _center(ob[0])
            axis_sep = abs(ax - bx) if rel in ("left of", "right of") else abs(ay - by)
            assert axis_sep >= MIN_SEP
            truth = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[rel]
            assert ("yes" if truth else "no") == a


def test_parquet_cached_atomic_and_versioned(tmp_path, monkeypatch):
    from bench.synthvqa import data

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path))
    p = data.ensure_test_parquet(n=20)
    assert p == tmp_path / "synthvqa" / f"v{GENERATOR_VERSION}" / "test-20.parquet"
    mtime = p.stat().st_mtime_ns
    assert data.ensure_test_parquet(n=20).stat().st_mtime_ns == mtime  # reused, not rewritten
    assert not [f for f in p.parent.iterdir() if f.name.endswith(".tmp")]
    rows = data.load_test(n=20)
    ref = make_example("test", 0, 7)
    assert rows[7]["question"] == ref["question"] and rows[7]["objects"] == json.loads(json.dumps(ref["objects"]))
    assert np.array_equal(np.asarray(rows[7]["image"]), np.asarray(ref["image"]))  # PNG is lossless


# ------------------------------------------------------------------------------------------ lmms-eval
def _models():
    from lmms_eval.api.model import lmms

    class _Base(lmms):
        def __init__(self, batch_size=1, max_batch_size=None, device="cpu", **kw):
            super().__init__()
            self.batch_size_per_gpu = int(batch_size)
            self.seen_visuals = []

        def loglikelihood(self, requests):
            raise NotImplementedError

        def generate_until_multi_round(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            out = []
            for req in requests:
                ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                doc = self.task_dict[task][split][doc_id]
                self.seen_visuals.append(doc_to_visual(doc))
                assert ctx.endswith("\nAnswer the question using a single word.")
                out.append(self.answer(ctx, doc))
            return out

    class Oracle(_Base):
        def answer(self, ctx, doc):
            return doc["answer"].capitalize() + "."

    class ConstantYes(_Base):
        def answer(self, ctx, doc):
            return "yes"

    class Mixed(_Base):
        """Right on about two thirds of the documents (by a hash of the question), wrong elsewhere: per-type accuracies differ."""

        def answer(self, ctx, doc):
            return doc["answer"] if sum(map(ord, doc["question"] + doc["qtype"])) % 3 else "zzz"

    _models.Mixed = Mixed
    return Oracle, ConstantYes


@pytest.mark.slow
def test_task_through_lmms_eval(tmp_path):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from bench.tasks.synthvqa import prepare_task_dir

    task_dir = prepare_task_dir(cache_dir=tmp_path, n=40)
    assert prepare_task_dir(cache_dir=tmp_path, n=40) == task_dir  # idempotent
    assert (task_dir / "synthvqa.yaml").exists() and (task_dir / "utils.py").exists()
    Oracle, ConstantYes = _models()
    scores = {}
    for cls in (Oracle, ConstantYes):
        model = cls()
        tm = TaskManager(include_path=str(task_dir), include_defaults=False)
        res = simple_evaluate(model=model, tasks=["synthvqa"], limit=20, task_manager=tm, batch_size=1)
        r = res["results"]["synthvqa"]
        scores[cls.__name__] = r
        vis = model.seen_visuals[0]
        assert len(vis) == 1 and vis[0].size == (336, 336) and vis[0].mode == "RGB"
    o, c = scores["Oracle"], scores["ConstantYes"]
    assert o["exact_match,none"] == 1.0
    for q in QTYPES:
        assert o[f"acc_{q},none"] == 1.0
    assert c["exact_match,none"] < 0.5
    assert c["acc_color,none"] == 0.0 and 0.0 < c["acc_exist,none"] < 1.0


def test_task_docs_keep_images_encoded_and_decode_the_same_pixels(tmp_path, monkeypatch):
    """process_docs leaves the PNG bytes alone (lmms-eval re-reads documents after generation);
    doc_to_visual decodes them into exactly the pixels the decoding column gives."""
    import datasets

    from bench.synthvqa import data
    from bench.tasks.synthvqa.task_utils import synthvqa_doc_to_visual, synthvqa_process_docs

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path))
    ds = datasets.load_dataset("parquet", data_files={"test": str(data.ensure_test_parquet(n=6))}, cache_dir=str(tmp_path / "hf"))["test"]
    lazy = synthvqa_process_docs(ds)
    for i in range(len(ds)):
        enc = lazy[i]["image"]
        assert isinstance(enc, dict) and isinstance(enc["bytes"], bytes)
        (got,) = synthvqa_doc_to_visual(lazy[i])
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(ds[i]["image"].convert("RGB")))
        assert lazy[i]["question"] == ds[i]["question"] and lazy[i]["answer"] == ds[i]["answer"]


@pytest.mark.slow
def test_each_metric_carries_its_own_stderr(tmp_path):
    """Every metric of the record (exact_match and each acc_<qtype>) carries the standard error of its own
    documents, checked against sqrt(sum((x - mean)^2) / (n - 1)) / sqrt(n) computed here by hand; before,
    each acc_<qtype> carried the overall stderr (every document reported every acc_<qtype>)."""
    import math

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from bench.evaluate import metric_stderr
    from bench.tasks.synthvqa import prepare_task_dir

    task_dir = prepare_task_dir(cache_dir=tmp_path, n=60)
    _models()
    res = simple_evaluate(model=_models.Mixed(), tasks=["synthvqa"], limit=60, task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                          batch_size=1, log_samples=True, bootstrap_iters=100)
    raw, samples = res["results"]["synthvqa"], res["samples"]["synthvqa"]
    by_type: dict[str, list[float]] = {}
    for s in samples:
        by_type.setdefault(s["doc"]["qtype"], []).append(float(s["exact_match"]))
        assert [k for k in s if k.startswith("acc_")] == [f"acc_{s['doc']['qtype']}"]  # only its own type
    groups = {"exact_match": [x for xs in by_type.values() for x in xs], **{f"acc_{q}": xs for q, xs in by_type.items()}}
    assert len(groups["exact_match"]) == 60 and all(len(xs) >= 5 for xs in by_type.values())
    errs = set()
    for name, xs in groups.items():
        n, mean = len(xs), sum(xs) / len(xs)
        by_hand = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)
        assert raw[f"{name},none"] == pytest.approx(mean, abs=1e-12)
        got = metric_stderr(raw, name, "none", raw[f"{name},none"], samples)
        assert got == pytest.approx(by_hand, rel=1e-9), name
        errs.add(round(got, 9))
    assert len(errs) > 2  # the per-type errors really differ from the overall one
    # a CLT stderr is not taken for a metric that is not the mean of its per-document scores (e.g. MME's sums)
    fake = {"total,none": 1500.0, "total_stderr,none": "N/A", "total_stderr_clt,none": 0.02}
    assert metric_stderr(fake, "total", "none", 1500.0, [{"total": {"score": 1.0}}, {"total": {"score": 0.0}}]) is None
    assert metric_stderr(fake, "total", "none", 0.5, [{"total": {"score": 1.0}}, {"total": {"score": 0.0}}]) == 0.02
