"""The project's lmms-eval model: any :class:`~bench.models.base.ModelAdapter` plus a pruning method.

Registered in lmms-eval's V2 registry as ``tokenprune`` (entry point ``lmms_eval.models`` in
``pyproject.toml``). ``bench.evaluate`` passes a ready instance to ``simple_evaluate`` together with a
``model_args`` string that carries every pruning setting and the run id, because lmms-eval's response
cache keys on ``str(model)`` plus the parsed ``model_args`` (lmms-eval.md): two methods must never
share cached answers.
"""

from __future__ import annotations

import gc
import json
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

MODEL_ID = "tokenprune"

#: ``batch_size=auto`` off CUDA: CPU memory is rarely the limit there and throughput stops growing
#: beyond a few tens of samples per forward; 16 keeps the per-batch latency of a 7B model bearable.
AUTO_CPU_BATCH = 16
#: ``batch_size=auto`` never exceeds this (unless ``max_batch_size`` says otherwise): beyond it a
#: 7B model's decode is compute-bound on an H100 and larger batches only add padding and latency.
AUTO_MAX_BATCH = 64
#: Share of the free GPU memory (after the model) that ``auto`` plans to fill: the probe's linear
#: extrapolation misses allocator fragmentation and prompts longer than the probed one.
AUTO_MEMORY_FRACTION = 0.8


def manifest():
    """Entry-point payload for lmms-eval's V2 registry."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="bench.lmms_model.TokenPruneModel")


def sample_seed(run_seed: int, task: str, doc_id: int) -> int:
    """Seed of one sample: depends on the run seed and the sample's identity, never its batch."""
    return zlib.crc32(f"{run_seed}:{task}:{doc_id}".encode()) & 0x7FFFFFFF


def first_line_cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


class TokenPruneModel(lmms):
    """lmms-eval model of every family (through the adapter contract, ``bench/models/base.py``) that prunes visual tokens with a method before (or inside) the LLM.

    Parameters
    ----------
    adapter : ModelAdapter, optional
        A loaded adapter. When constructed by lmms-eval from ``model_args`` instead, ``run_config``
        points to a resolved run config (JSON) from which adapter and method are instantiated.
    method : PruningMethod, optional
    batch_size : int or "auto"
        Requests per forward; requests are grouped by prompt length (lmms-eval's ``Collator``), left
        padded, and every sample is pruned on its own. ``auto`` is resolved at the first
        ``generate_until`` (:meth:`resolve_batch_size`); ``self.batch_size`` then holds the number.
    max_batch_size : int, optional
        Upper bound for ``auto`` (default :data:`AUTO_MAX_BATCH`).
    seed : int
        Run seed (per-sample seeds for random methods derive from it).
    """

    is_simple = True

    def __init__(
        self,
        adapter=None,
        method=None,
        run_config: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if adapter is None:
            if run_config is None:
                raise ValueError("TokenPruneModel needs either adapter+method or run_config=<path to resolved config JSON>")
            from bench.build import build_adapter, build_method

            cfg = json.loads(Path(run_config).read_text())
            adapter = build_adapter(cfg).load()
            method = build_method(cfg)
            seed = cfg.get("seed", seed)
        self.adapter = adapter
        self.method = method
        self.seed = int(seed)
        self.batch_size_setting: int | str = batch_size
        if str(batch_size).strip().lower() == "auto":
            self.batch_size: int | None = None  # resolved at the first generate_until
        else:
            try:
                self.batch_size = int(batch_size)
            except (TypeError, ValueError):
                self.batch_size = 0
            if self.batch_size < 1:
                raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
        self.max_batch_size = int(max_batch_size) if max_batch_size else AUTO_MAX_BATCH
        self.auto_batch: dict[str, Any] | None = None  # how `auto` was resolved (probe measurements)
        # per sample: doc_id, visual tokens in/kept, generated token ids
        self.stats: list[dict[str, Any]] = []
        # wall time inside generate_until (device synchronised), for throughput measurements
        self.generate_s = 0.0
        # with time_phases, generate_until's time split into inputs (documents -> processor batch),
        # prepare (vision tower + pre-LLM method + embeddings) and generate (LLM, in-LLM method,
        # decoding), each phase closed by a device synchronisation; off by default (it adds syncs)
        self.time_phases = False
        self.phase_s: dict[str, float] = {"inputs": 0.0, "prepare": 0.0, "generate": 0.0}

    def __str__(self) -> str:  # the response cache keys on str(model)
        return MODEL_ID

    # lmms-eval reads these
    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    def _prompt(self, context: str) -> str:
        return self.adapter.chat_prompt(context.replace("<image>", "").strip())

    def _processor(self):
        proc = self.adapter.processor
        if proc is None:
            raise RuntimeError(f"model {self.adapter.name!r} has no processor (random weights?); it cannot answer benchmark questions")
        return proc

    def _generate(self, chunk) -> tuple[Any, torch.Tensor]:
        """Prune and generate for one batch of request args; returns ``(prepared, new token ids)``."""
        proc = self._processor()
        lap = self._phase_timer()
        contexts, all_gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
        gen_kwargs = dict(all_gen_kwargs[0])
        images = []
        for d2v, doc_id, task, split in zip(doc_to_visual, doc_ids, tasks, splits):
            vis = d2v(self.task_dict[task][split][doc_id])
            if len(vis) != 1:
                raise NotImplementedError(f"{task} doc {doc_id} has {len(vis)} images; only single-image samples are supported")
            images.append(vis[0].convert("RGB"))
        prompts = [self._prompt(c) for c in contexts]
        batch = self.adapter.process(images, prompts)
        # the user text of each prompt: question-conditioned methods (CDPruner) encode it with CLIP's text tower
        batch["texts"] = [c.replace("<image>", "").strip() for c in contexts]
        seeds = torch.tensor([sample_seed(self.seed, t, d) for t, d in zip(tasks, doc_ids)], dtype=torch.long)
        lap("inputs")
        prepared = self.adapter.prepare(batch, self.method, seeds)
        lap("prepare")
        max_new = int(gen_kwargs.get("max_new_tokens", 128))
        # min_new_tokens (through simple_evaluate's gen_kwargs) fixes the generated length, so that
        # throughput measurements compare equal work at every batch size
        extra = {"min_new_tokens": int(gen_kwargs["min_new_tokens"])} if gen_kwargs.get("min_new_tokens") else {}
        new_tokens = self.adapter.generate(prepared, max_new_tokens=max_new, method=self.method, **extra)
        lap("generate")
        return prepared, new_tokens

    def _sync(self):
        """A no-argument device synchronisation for wall-clock timing (a no-op off CUDA)."""
        return torch.cuda.synchronize if self.adapter.device.type == "cuda" else (lambda: None)

    def _phase_timer(self):
        """``lap(phase)`` adds the (synchronised) time since the last lap to ``phase_s[phase]``; a no-op
        unless ``time_phases``."""
        if not self.time_phases:
            return lambda phase: None
        sync = self._sync()
        last = [time.perf_counter()]

        def lap(phase: str) -> None:
            sync()
            now = time.perf_counter()
            self.phase_s[phase] += now - last[0]
            last[0] = now

        return lap

    def resolve_batch_size(self, requests: list[Instance]) -> int:
        """Resolve ``batch_size=auto``: the largest batch that fits the device's memory budget.

        On CUDA, one pruned generate of the longest request (the whole path: vision tower, method,
        LLM with its KV cache for ``max_new_tokens``) is run at batch 1 and 4 after a warm-up, and
        the peak allocated memory above the model is extrapolated linearly:
        ``batch = (free * AUTO_MEMORY_FRACTION - fixed) / per_sample``, clamped to
        ``[1, max_batch_size]``. ``free`` counts the memory the CUDA driver reports free plus what
        torch's allocator holds unused. Off CUDA the batch is :data:`AUTO_CPU_BATCH`.
        The probe's details are kept in ``self.auto_batch``.
        """
        dev = self.adapter.device
        if dev.type != "cuda":
            b = min(AUTO_CPU_BATCH, self.max_batch_size)
            self.auto_batch = {"device": dev.type, "batch_size": b, "rule": f"fixed default off CUDA (AUTO_CPU_BATCH={AUTO_CPU_BATCH})"}
            return b
        longest = max((r.args for r in requests), key=lambda a: len(a[0]))
        peaks = {}
        for b in (1, 1, 4):  # the first batch-1 run is a warm-up: cuBLAS workspaces and kernels are allocated once
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            out = self._generate([longest] * b)
            del out
            torch.cuda.synchronize(dev)
            peaks[b] = torch.cuda.max_memory_allocated(dev) - base
        per_sample = max((peaks[4] - peaks[1]) / 3, 1.0)
        fixed = max(peaks[1] - per_sample, 0.0)
        free, _ = torch.cuda.mem_get_info(dev)
        avail = free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        fit = int((avail * AUTO_MEMORY_FRACTION - fixed) // per_sample)
        b = max(1, min(fit, self.max_batch_size))
        self.auto_batch = {
            "device": torch.cuda.get_device_name(dev),
            "batch_size": b,
            "fits": fit,
            "per_sample_bytes": int(per_sample),
            "fixed_bytes": int(fixed),
            "available_bytes": int(avail),
            "memory_fraction": AUTO_MEMORY_FRACTION,
            "max_batch_size": self.max_batch_size,
            "probe_prompt_chars": len(longest[0]),
            "rule": "peak memory of one pruned generate at batch 1 and 4, extrapolated to the free memory",
        }
        return b

    def generate_until(self, requests: list[Instance]) -> list[str]:
        tok = self._processor().tokenizer
        sync = self._sync()
        sync()
        t0 = time.perf_counter()
        # Everything alive now (model, datasets, lmms-eval's documents and instances) goes to the GC's
        # permanent generation for the loop: otherwise every full collection triggered by generate()'s
        # allocations rescans that heap, which stalls the launch-bound decoding loop (H100, 7B, batch 16:
        # 0.37 s of GC in 2.8 s of evaluation, measured with the freeze off; README "Batch size").
        # Objects created by the loop are still collected.
        gc.freeze()
        try:
            return self._generate_all(requests, tok, sync, t0)
        finally:
            gc.unfreeze()

    def _generate_all(self, requests: list[Instance], tok, sync, t0: float) -> list[str]:
        if self.batch_size is None:
            self.batch_size = self.resolve_batch_size(requests)

        def _collate(args):
            # longest prompts first (lmms-eval's convention): OOMs show up at once, and similar
            # lengths share a batch so little padding is needed
            return -len(args[0]), args[0]

        re_ords = lmms_utils.Collator([r.args for r in requests], _collate, grouping=True)
        chunks = re_ords.get_batched(n=self.batch_size, batch_fn=None)
        res: list[str] = []
        pbar = tqdm(total=len(requests), desc=f"{self.adapter.name}/{self.method.name} r={self.method.prune_ratio} b={self.batch_size}", unit="q")
        for chunk in chunks:
            contexts, all_gen_kwargs, _, doc_ids, tasks, _ = zip(*chunk)
            until = all_gen_kwargs[0].get("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            prepared, new_tokens = self._generate(chunk)
            texts = tok.batch_decode(new_tokens, skip_special_tokens=True)
            per_layer = prepared.visual_tokens_per_layer(self.adapter.num_llm_layers)
            ids = new_tokens.tolist()
            for i, (ctx, text, doc_id, task) in enumerate(zip(contexts, texts, doc_ids, tasks)):
                text = first_line_cut(text, until).strip()
                res.append(text)
                self.stats.append(
                    {
                        "task": task,
                        "doc_id": doc_id,
                        "visual_tokens_in": prepared.visual_tokens_in[i],
                        "visual_tokens_kept": prepared.visual_tokens_kept[i],
                        "visual_tokens_per_layer": per_layer[i],
                        "generated_ids": ids[i],
                    }
                )
                self.cache_hook.add_partial("generate_until", (ctx, all_gen_kwargs[0]), text)
            pbar.update(len(chunk))
        pbar.close()
        sync()
        self.generate_s += time.perf_counter() - t0
        return re_ords.get_original(res)

    def clean(self) -> None:
        """Called by lmms-eval after every evaluation. Its default deletes the model's modules and
        runs ``gc.collect()`` + ``empty_cache()``: seconds per evaluation for nothing here, since
        this object holds no module and the adapter outlives it (a sweep's ``bench.build.ModelCache``
        reuses it for the next run)."""

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "tokenprune: loglikelihood tasks are not supported yet; the benchmarks of the LLaVA-1.5 table are generate_until tasks"
        )

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("tokenprune: multi-round generation is not supported")


#: the class's name before it ran every family (kept for existing imports)
TokenPruneLlava = TokenPruneModel
