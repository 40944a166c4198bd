"""lmms-eval hooks of the SynthVQA task (re-exported by the generated task directory's utils.py).

Metrics: ``exact_match`` (overall accuracy; prediction normalised to its first lowercase word without
punctuation) and ``acc_<qtype>`` per question type, aggregated like MME's per-category scores: every doc
returns ``{"qtype", "score"}`` for each of them and the aggregation averages only the docs of its type.
"""

from __future__ import annotations

import io
import math
import re

from PIL import Image

QTYPES = ("color", "shape", "count", "position", "exist")


def synthvqa_process_docs(dataset):
    """The split with its ``image`` column left encoded (PNG bytes).

    lmms-eval iterates the documents again after generation (post-processing, sample logging), and a
    ``datasets`` ``Image`` column decodes the PNG at every row access: about 1 ms per question of work
    nobody looks at. Decoding happens once, in :func:`synthvqa_doc_to_visual`, when the model needs the
    pixels (the same PNG decoder either way, so the same pixels).
    """
    from datasets import Image as ImageFeature

    return dataset.cast_column("image", ImageFeature(decode=False))


def synthvqa_doc_to_visual(doc):
    img = doc["image"]
    if isinstance(img, dict):  # an encoded datasets Image: {"bytes": ..., "path": ...}
        img = Image.open(io.BytesIO(img["bytes"])) if img.get("bytes") is not None else Image.open(img["path"])
    elif isinstance(img, (bytes, bytearray)):
        img = Image.open(io.BytesIO(img))
    return [img.convert("RGB")]


def synthvqa_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def normalize_answer(text: str) -> str:
    """First word of the prediction, lowercased, punctuation stripped ('' if none)."""
    words = re.findall(r"[a-z0-9]+", str(text).lower())
    return words[0] if words else ""


def synthvqa_process_results(doc, results):
    pred = normalize_answer(results[0] if results else "")
    score = 1.0 if pred == normalize_answer(doc["answer"]) else 0.0
    out = {"exact_match": score}
    for q in QTYPES:
        out[f"acc_{q}"] = {"question_id": doc["question_id"], "qtype": doc["qtype"], "score": score}
    return out


def _agg(qtype: str, results) -> float:
    scores = [r["score"] for r in results if r["qtype"] == qtype]
    return sum(scores) / len(scores) if scores else math.nan


def synthvqa_agg_color(results):
    return _agg("color", results)


def synthvqa_agg_shape(results):
    return _agg("shape", results)


def synthvqa_agg_count(results):
    return _agg("count", results)


def synthvqa_agg_position(results):
    return _agg("position", results)


def synthvqa_agg_exist(results):
    return _agg("exist", results)
