"""lmms-eval hooks of the SynthVQA task (re-exported by the generated task directory's utils.py).

Metrics: ``exact_match`` (overall accuracy; prediction normalised to its first lowercase word without
punctuation) and ``acc_<qtype>`` per question type. A document reports ``exact_match`` and the one
``acc_<qtype>`` of its own type, so each per-type metric is the plain mean over its own documents and
lmms-eval's ``mean`` aggregation gives each its own standard error (``sqrt(p(1-p)/(n-1))`` over that
type's ``n`` documents). Emitting every ``acc_<qtype>`` for every document (as before) made lmms-eval
compute each per-type stderr over all documents.
"""

from __future__ import annotations

import io
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
    # only this document's own type: each acc_<qtype> then averages (and gets its stderr from) its own docs
    return {"exact_match": score, f"acc_{doc['qtype']}": score}
