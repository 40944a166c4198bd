"""The project's lmms-eval model: any :class:`~bench.models.base.ModelAdapter` plus a pruning method.

Registered in lmms-eval's V2 registry as ``tokenprune`` (entry point ``lmms_eval.models`` in
``pyproject.toml``). The runner passes a ready instance to ``simple_evaluate`` together with a
``model_args`` string that carries every pruning setting and the run id, because lmms-eval's response
cache keys on ``str(model)`` plus the parsed ``model_args`` (lmms-eval.md): two methods must never
share cached answers.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

MODEL_ID = "tokenprune"


def manifest():
    """Entry-point payload for lmms-eval's V2 registry."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="bench.lmms_model.TokenPruneLlava")


def sample_seed(run_seed: int, task: str, doc_id: int) -> int:
    """Seed of one sample: depends on the run seed and the sample's identity, never its batch."""
    return zlib.crc32(f"{run_seed}:{task}:{doc_id}".encode()) & 0x7FFFFFFF


def first_line_cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


class TokenPruneLlava(lmms):
    """lmms-eval model that prunes visual tokens with a method before (or inside) the LLM.

    Parameters
    ----------
    adapter : ModelAdapter, optional
        A loaded adapter. When constructed by lmms-eval from ``model_args`` instead, ``run_config``
        points to a resolved run config (JSON) from which adapter and method are instantiated.
    method : PruningMethod, optional
    batch_size : int
        Requests per forward; requests are grouped by prompt length (lmms-eval's ``Collator``), left
        padded, and every sample is pruned on its own.
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
                raise ValueError("TokenPruneLlava needs either adapter+method or run_config=<path to resolved config JSON>")
            from bench.runner import build_adapter, build_method

            cfg = json.loads(Path(run_config).read_text())
            adapter = build_adapter(cfg).load()
            method = build_method(cfg)
            seed = cfg.get("seed", seed)
        self.adapter = adapter
        self.method = method
        self.seed = int(seed)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1
        self.stats: list[dict[str, Any]] = []  # per sample: doc_id, visual tokens in/kept

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
        from bench.models.llava import chat_prompt

        return chat_prompt(self.adapter.processor, context.replace("<image>", "").strip())

    def generate_until(self, requests: list[Instance]) -> list[str]:
        proc = self.adapter.processor
        if proc is None:
            raise RuntimeError(f"model {self.adapter.name!r} has no processor (random weights?); it cannot answer benchmark questions")
        tok = proc.tokenizer

        def _collate(args):
            # longest prompts first (lmms-eval's convention): OOMs show up at once, and similar
            # lengths share a batch so little padding is needed
            return -len(args[0]), args[0]

        re_ords = lmms_utils.Collator([r.args for r in requests], _collate, grouping=True)
        chunks = re_ords.get_batched(n=self.batch_size, batch_fn=None)
        res: list[str] = []
        pbar = tqdm(total=len(requests), desc=f"{self.adapter.name}/{self.method.name} r={self.method.prune_ratio}", unit="q")
        for chunk in chunks:
            contexts, all_gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            gen_kwargs = dict(all_gen_kwargs[0])
            images = []
            for d2v, doc_id, task, split in zip(doc_to_visual, doc_ids, tasks, splits):
                vis = d2v(self.task_dict[task][split][doc_id])
                if len(vis) != 1:
                    raise NotImplementedError(f"{task} doc {doc_id} has {len(vis)} images; only single-image samples are supported")
                images.append(vis[0].convert("RGB"))
            prompts = [self._prompt(c) for c in contexts]
            batch = proc(images=images, text=prompts, return_tensors="pt", padding=True)
            seeds = torch.tensor([sample_seed(self.seed, t, d) for t, d in zip(tasks, doc_ids)], dtype=torch.long)
            prepared = self.adapter.prepare(batch, self.method, seeds)
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_new_tokens", 128))
            new_tokens = self.adapter.generate(prepared, max_new_tokens=max_new, method=self.method)
            texts = tok.batch_decode(new_tokens, skip_special_tokens=True)
            per_layer = prepared.visual_tokens_per_layer(self.adapter.num_llm_layers)
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
                    }
                )
                self.cache_hook.add_partial("generate_until", (ctx, all_gen_kwargs[0]), text)
            pbar.update(len(chunk))
        pbar.close()
        return re_ords.get_original(res)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "tokenprune: loglikelihood tasks are not supported yet; the benchmarks of the LLaVA-1.5 table are generate_until tasks"
        )

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("tokenprune: multi-round generation is not supported")
