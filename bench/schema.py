"""The run record: one ``record.json`` per run, the only input of aggregation; and the leaderboard's columns.

Every key is documented here; bump :data:`SCHEMA_VERSION` when a key changes meaning. A number that
was not measured is ``null`` (with the reason in ``notes``), never a made-up value.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

SCHEMA_VERSION = 2  # 2: tflops_prefill_paper_convention in multiply-adds (was x2); budget_* fields


class MetricValue(TypedDict):
    value: float | None  # the metric as lmms-eval aggregates it (accuracy in [0, 1], MME score, ...)
    stderr: float | None  # lmms-eval's bootstrap/analytic stderr when it reports one, else null
    higher_is_better: bool  # from the task's metric_list


class Efficiency(TypedDict):
    visual_tokens_in: float | None  # visual tokens per image before pruning (576 for LLaVA-1.5; a mean where the count varies per image: LLaVA-NeXT newlines included, Qwen2.5-VL)
    visual_tokens_kept: float | None  # mean over evaluated samples of the visual tokens that reach the LLM
    visual_tokens_per_layer: list[float] | None  # visual tokens entering each LLM decoder layer (mean over samples)
    visual_tokens_layer_mean: float | None  # mean of the list above (the `layer_mean` budget convention)
    budget_mode: str | None  # how the budget was counted: pre_llm_exact | in_vision_exact | adaptive (PruMerge's own) | official | layer_mean | after_prune (in-LLM)
    budget_tokens: int | None  # B = round(N (1 - ratio)): the budget asked for
    budget_measure: str | None  # the count the budget names: kept | layer_mean | after_prune (tokens entering the first pruned layer)
    budget_measured: float | None  # that count, measured (mean over samples)
    budget_met: bool | None  # budget_measured within one token of budget_tokens; false: tables place the row under budget_measured, never under B
    tflops_prefill: float | None  # counted FLOPs (2 x multiply-adds, torch FlopCounterMode) per sample of vision encoder + selection + LLM prefill, / 1e12
    tflops_prefill_analytic: float | None  # bench.measure.flops's analytic model of the same forward per sample, the method's scoring/selection matrix products included (tests: equals tflops_prefill within 1%); null when the method has no selection formula
    tflops_selection_analytic: float | None  # the selection part of tflops_prefill_analytic (recomputed attention rows, similarity matrices, re-projection of merged tokens); null as above
    tflops_prefill_analytic_no_selection: float | None  # tflops_prefill_analytic minus the selection part (vision incl. ToMe's merged blocks, projector, LLM, lm_head)
    tflops_prefill_paper_convention: float | None  # the papers' convention, / 1e12: FastV's 4nd^2 + 2n^2d + 2ndm multiply-adds (not x2) per LLM layer, LLM only, n = paper_convention_text_tokens + the layer's visual tokens
    paper_convention_text_tokens: float | None  # the prompt's text tokens (mean per sample) behind tflops_prefill_paper_convention
    flops_llm_analytic: int | None  # analytic FLOPs of the LLM prefill (+ lm_head) of the measured batch
    latency: dict[str, dict[str, float | None]] | None  # measure.stages: {vision_encoder, selection, selection_graph (CUDA, graph-safe pre-LLM methods), prefill_eager, prefill_graph, prefill_compiled_graph, decode_step}: {median_ms, iqr_ms}; decode_step adds tokens_per_s (batch x 1000 / median_ms), prefill_compiled_graph adds variant, compile_s, compile_reused, max_abs_diff_vs_eager, max_abs_eager
    roofline: dict[str, float | None] | None  # measured matmul TFLOP/s and copy GB/s, LLM weight bytes, llm_prefill_floor_ms
    prefill_ms: float | None  # median wall time of one sample's vision encoder + selection + LLM prefill
    prefill_ms_iqr: float | None  # inter-quartile range of the repeats behind prefill_ms
    host_load: float | None  # CPU runs: 1-minute load average per core (os.getloadavg / cpu_count) when prefill_ms was measured (CPU latency is indicative); null on GPU
    timer: str | None  # "cuda_events" on GPU, "wall_clock" (time.perf_counter) on CPU
    timing_repeats: int | None  # timed repeats after warm-up
    kv_cache_bytes: int | None  # bytes of all K/V tensors in the cache after one sample's prefill, read from the tensors
    kv_cache_bytes_per_layer: list[int] | None  # the same, per decoder layer
    peak_mem_bytes: int | None  # torch.cuda.max_memory_allocated over the measurement pass; null on CPU
    device: str | None  # "cpu" or the GPU name
    measured_batch_size: int | None  # batch size of the measurement pass


class Provenance(TypedDict):
    git_sha: str | None  # commit of the harness that produced the record
    git_dirty: bool | None  # uncommitted changes at run time to the code that decides results (bench/, methods/, kernels/, conf/, pyproject.toml, requirements/)
    versions: dict[str, str | None]  # torch, transformers, lmms_eval, python
    lock_file: str | None  # the lock this machine type installs (requirements/lock-<machine>.txt); null outside a checkout
    lock_digest: str | None  # sha256 (16 hex) of that lock file
    env_digest: str  # sha256 (16 hex) of the sorted name==version lines of `distributions`
    distributions: dict[str, str]  # every installed distribution (normalized name -> version), the project and pip excluded
    dtype: str  # model dtype
    attn_implementation: str  # attention backend of the LLM and vision tower
    batch_size: int | None  # batch size the accuracy pass ran at; without an accuracy pass, the configured integer (null for "auto")
    batch_size_setting: int | str | None  # benchmark.batch_size as configured: an integer, or "auto" (then batch_size is what the memory probe chose)
    model_fingerprint: str  # content hash of local weights, hub snapshot commit, or "random-init" (the leaderboard keys rows by it)
    weights_revision: str  # content hash (local) or snapshot commit (hub) of the weights actually loaded
    weights_format: str | None  # what was loaded: safetensors | pickle (opted in with model.allow_pickle_weights) | random-init | hub-safetensors | hub-pickle
    pickle_weights_allowed: bool  # model.allow_pickle_weights was set (pickle files may be unpickled on load)
    benchmark_fingerprint: str  # synthvqa-gen<version>, or lmms_eval-<version>:<task>:yaml=<digest>:data=<identity>:limit=<limit>
    text_tower_fingerprint: NotRequired[str]  # question-conditioned methods (CDPruner) only: model.text_tower's content hash or hub:<id>
    date: str  # ISO-8601 UTC time the record was written
    hostname: str
    cpu: NotRequired[str]  # host CPU and torch's vector ISA ("AMD EPYC / AVX512"): CPU answers may round differently on another (absent in older records)


class Data(TypedDict, total=False):
    """What was evaluated (bench/task_data.py); its ``identity`` is part of the run id's benchmark fingerprint."""

    task: str  # the lmms-eval task run: benchmark.task, or a generated <task>__local_<digest> / <task>__hub_<digest> over other data
    origin: str  # "generated" (SynthVQA), "hub" (the task's or another hub dataset, or its copy in the HF cache), "local" (benchmark.dataset_path)
    dataset_path: str | None  # hub id or local path read
    dataset_name: str | None  # hub config (subset), where one was set
    split: str  # the split evaluated
    n_items: int | None  # rows of that split before benchmark.limit (null where the hub card does not say)
    fingerprint: str  # datasets' fingerprint of a save_to_disk split, <hub id>@<revision>, or files-<digest of names, sizes, mtimes>
    revision: str | None  # the hub revision datasets resolved (hub origin only)
    task_yaml_digest: str  # sha256 (12 hex) of the task's YAML include chain and its hook modules
    identity: str  # origin:fingerprint:split:n (+ images): what the leaderboard groups rows by
    images: dict[str, Any] | None  # GQA: the second dataset its images come from (same keys), or origin "embedded"


class Record(TypedDict, total=False):
    schema_version: int
    run_id: str  # sha1 of the identity (resolved config minus runtime-only keys + fingerprints), 10 hex chars
    status: Literal["completed", "failed"]
    model: str  # model config name (llava15_7b)
    method: str  # method config name (divprune)
    ratio: float  # nominal fraction of visual tokens removed
    benchmark: str  # benchmark config name (gqa)
    task: str  # benchmark.task (the lmms-eval task actually run is data.task)
    data: Data  # origin, size and identity of the data evaluated (absent in records older than issue 26)
    seed: int
    limit: int | None  # benchmark.limit: number of samples evaluated when not the full split
    n_samples: int | None  # samples evaluated
    primary_metric: str | None  # the metric the leaderboard ranks by
    method_deviations: list[str]  # the method's deliberate departures from its official code ("name: official; here"), e.g. DivPrune's per-sample selection
    method_resolved: dict[str, Any]  # options given as auto and the value each took on this model (VScan/FlowCut: {"port": "qwen25vl"}); {} for most methods
    accuracy_measured: bool  # false for efficiency-only or random-weight runs (metrics is then {})
    metrics: dict[str, MetricValue]
    efficiency: Efficiency
    provenance: Provenance
    config: dict[str, Any]  # the fully resolved config the run used
    notes: list[str]  # why a field is null, what is approximate
    error: str | None  # for status == "failed": the exception, one line
    started_at: str
    finished_at: str
    wall_s: float


#: the columns of ``leaderboard.csv`` (and ``leaderboards/<model>.csv``), column -> meaning
LEADERBOARD_COLUMNS: dict[str, str] = {
    "model": "model config name",
    "method": "method config name",
    "ratio": "nominal fraction of visual tokens removed",
    "visual_tokens": "measured visual tokens per sample, averaged over the LLM's layers (= tokens kept for pre-LLM methods)",
    "benchmark": "benchmark config name",
    "metric": "primary metric of the benchmark",
    "score": "value of the primary metric (null for efficiency-only runs)",
    "retention_pct": "score / score of method=none on the same model (and weights), benchmark, data and number of samples x 100; "
    "empty where that baseline was not run (`python -m bench aggregate` and the tables' footnotes name the run to make)",
    "budget": "the visual-token budget the row stands for: B = round(N(1 - ratio)) where the run met it, else the count it "
    "measured (budget_met false; a row is never shown under a budget it missed)",
    "budget_mode": "how the budget is counted: pre_llm_exact (exactly B tokens reach the LLM), official (the method's published "
    "schedule for B), layer_mean (mean over the LLM's layers = B: equal LLM compute), after_prune (B after the first pruning "
    "layer), adaptive (the method's own count); 'unrecorded' for records older than the field",
    "budget_met": "whether the count the budget names (kept tokens, the layer mean, or the count after the first pruning "
    "stage: the record's budget_measure) is within one token of B; empty for records older than the field",
    "tflops_prefill": "measured TFLOPs of one sample's vision encoder + selection + LLM prefill",
    "prefill_ms": "median time of that prefill (see `device` and the record's `timer`); on CPU indicative only (wall clock on a shared host)",
    "prefill_ms_iqr": "inter-quartile range of the timed repeats behind prefill_ms (its spread)",
    "host_load": "CPU runs: 1-minute load average per core while prefill_ms was measured (above ~1 the timing is stretched by other processes); empty on GPU",
    "kv_cache_mb": "KV-cache size after one sample's prefill, MiB, read from the cache tensors",
    "device": "where efficiency was measured",
    "n_samples": "samples evaluated (smaller than the split when benchmark.limit was set)",
    "data": "where the data came from: generated (SynthVQA), hub (the task's hub dataset or its cache), local (benchmark.dataset_path)",
    "data_items": "rows of the evaluated split before benchmark.limit (a local copy may be a subset of the benchmark)",
    "weights": "fingerprint of the model's weights (provenance.model_fingerprint: content hash of local weight files, hub "
    "snapshot commit, or random-init; 'unrecorded' for records without provenance): rows are keyed by it, and a model "
    "name with rows of several weights shows as <model>@<weights[:8]>",
    "run_id": "run id (results/runs/<run_id>/record.json)",
    "env": "digest of the installed Python distributions the row was measured under (provenance.env_digest; "
    "'unrecorded' for records older than that field): rows of one model and benchmark with different values "
    "were measured under different environments",
}
