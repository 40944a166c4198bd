"""LLaVA-1.5-style models through transformers' native ``LlavaForConditionalGeneration``.

Pre-LLM pruning happens between the projector and the LLM: the adapter encodes the images
(vision tower, feature layer, CLS dropped, projector — exactly ``LlavaModel.get_image_features``),
lets the method pick or merge the ``N`` projected tokens, rebuilds every prompt with exactly that many
image placeholder tokens, and scatters the kept features into the input embeddings, as
``LlavaModel.forward`` does with the full set. The LLM therefore sees contiguous (renumbered)
position ids, as in the official LLaVA code of every pre-LLM method (methods.md, section 0.2).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from bench.errors import ConfigError, CorruptFileError, IncompatibleMethodError, MissingWeightsError
from bench.models.base import FlopsDescription, ImageBlock, ModelAdapter, PreparedBatch
from methods.base import PruningMethod, VisionContext

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device} was asked for, but CUDA is not available on this machine (use device=cpu or auto)")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"model.dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def resolve_source(source: str) -> tuple[str, bool]:
    """``bench:<name>`` -> the packaged asset directory; returns ``(path_or_hub_id, is_local)``."""
    if source.startswith("bench:"):
        return str(ASSETS / source.split(":", 1)[1]), True
    p = Path(source).expanduser()
    if p.exists() or source.startswith(("/", ".", "~")):
        return str(p), True
    return source, False


#: Weight files, by name: every one of them counts in a local model's fingerprint (retrained ``.bin`` weights
#: must give a new run id, not reuse the old one). Files absent from a directory add nothing to the hash, so
#: a safetensors-only model (the embedded one) keeps the fingerprint it always had.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "*.npz")
#: Weight formats that unpickle on load (``torch.load``): refused unless ``model.allow_pickle_weights=true``.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def weight_files(root: Path) -> list[Path]:
    """Weight files directly in ``root`` (where ``from_pretrained`` looks), sorted by path."""
    return sorted({f for pat in WEIGHT_PATTERNS for f in root.glob(pat) if f.is_file()})


def local_fingerprint(path: str) -> str:
    """Content hash of a local model directory's config, tokenizer and every weight file.

    The hash runs over ``config.json``, ``tokenizer.json`` and the files of :data:`WEIGHT_PATTERNS`, sorted
    by path, each as its name then its bytes; 16 hex characters.
    """
    h = hashlib.sha256()
    root = Path(path)
    files = sorted({*root.glob("config.json"), *weight_files(root), *root.glob("tokenizer.json")})
    if not files:
        return "missing"
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached by (path, size, mtime) so a run checks each pinned file once."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _SHA256_CACHE[key] = h.hexdigest()
    return _SHA256_CACHE[key]


def check_pins(model: str, root: Path, pins: dict[str, str] | None) -> None:
    """Raise :class:`CorruptFileError` naming the first file under ``root`` whose sha256 is not its pin.

    ``pins`` maps a file name relative to the model directory to its lowercase hex sha256
    (``model.sha256`` in ``conf/model/*.yaml``).
    """
    for name, want in sorted((pins or {}).items()):
        f = root / name
        if not f.is_file():
            raise CorruptFileError(f"model {model!r}: {f} is pinned by model.sha256 but does not exist")
        got = file_sha256(f)
        if got != str(want).lower():
            raise CorruptFileError(
                f"model {model!r}: {f} does not match its pinned sha256 (model.sha256[{name!r}]): expected {want}, "
                f"found {got}. The file was changed or damaged: restore it. If model.source points at a deliberately "
                f"different checkpoint, pass model.sha256=null (it then gets its own run ids and leaderboard rows)."
            )


def pickle_weights(root: Path) -> list[Path]:
    """Pickled weight files that ``from_pretrained`` would load from ``root`` (none when safetensors exist)."""
    if any(root.glob("*.safetensors")):
        return []
    return sorted({f for pat in PICKLE_PATTERNS for f in root.glob(pat) if f.is_file()})


def _hub_cached_file(repo_id: str, name: str) -> Path | None:
    """The locally cached copy of ``name`` in a hub repo's snapshot, or ``None``."""
    try:
        from huggingface_hub import try_to_load_from_cache

        f = try_to_load_from_cache(repo_id, name)
    except Exception:  # noqa: BLE001 - an unusable cache reads as "not cached"
        return None
    return Path(f) if isinstance(f, str) else None


def hub_fingerprint(repo_id: str) -> str:
    """Commit of the locally cached snapshot of a hub repo, or ``"not-cached"``."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cfg = try_to_load_from_cache(repo_id, "config.json")
        if isinstance(cfg, str):
            return Path(cfg).parent.name  # .../snapshots/<commit>/config.json
    except Exception:  # noqa: BLE001 - a fingerprint is best-effort metadata, never fatal
        pass
    return "not-cached"


class LlavaAdapter(ModelAdapter):
    """Adapter for ``LlavaForConditionalGeneration`` (LLaVA-1.5 and the tiny embedded default).

    Parameters
    ----------
    name : str
        Model name used in records (``llava15_7b``).
    source : str
        Hugging Face repo id, a local directory, or ``bench:<asset>`` for a packaged model.
    weights : {"pretrained", "random"}
        ``random`` builds the architecture from its config with random weights, for
        efficiency-only runs; such records carry no accuracy.
    config_file : str, optional
        ``bench:configs/<file>.json`` or a path: the architecture config used for ``weights=random``
        when the source is not available locally.
    dtype, attn_implementation, device : str
        ``auto`` dtype is fp16 on CUDA and fp32 on CPU; attention defaults to SDPA.
    download : bool
        Allow fetching from the hub when weights are not cached (off by default: offline machines
        would otherwise hang on network retries).
    sha256 : dict, optional
        ``{file name: sha256}`` pins of weight files, checked before any model work (a mismatch exits 2
        naming the file). Hub files are checked in the local cache.
    allow_pickle_weights : bool
        Load pickled weights (``*.bin``, ``*.pt``) when a model has no safetensors. Off by default: a
        pickle can run code when loaded; the record's provenance says which format was loaded.
    text_tower : dict, optional
        ``{source, sha256}``: the CLIP checkpoint whose text tower and ``visual_projection`` question-conditioned
        methods (CDPruner) use (``bench.models.clip_text``); ``None``: the model has none and such methods are
        refused. Loaded only for a method that asks for it; its content fingerprint joins such runs' identity.
    """

    family = "llava"
    #: transformers classes of the family (a subclass for another LLaVA-style family names its own)
    model_class_name = "LlavaForConditionalGeneration"
    config_class_name = "LlavaConfig"
    # "in_vision" and "in_llm" are added when bench/models/vision_merge.py and llm_pruning.py exist
    supported_stages = frozenset({"none", "pre_llm", "in_vision", "in_llm"})
    #: Replay ``graph_safe`` selections (and ToMe's merging tower) from CUDA graphs on CUDA: the same
    #: kernels, bit-identical outputs, without batch-1 launch overhead (``clip_extras.GraphedSelection``).
    selection_graphs = True
    #: On CUDA, run the vision tower + projector one image at a time inside a batch. cuBLAS picks GEMM
    #: kernels by the row count (B x 577), so batched fp16 features differ from batch-1 ones in the last
    #: bits (max 0.016 on the tiny model); discrete selections amplify that (DivPrune kept a different set
    #: for 59% of images at batch 8, ``results/batch_identity_diag_h100.csv``), so answers would depend on
    #: batch neighbours. Per image, the features are bit-identical to batch 1. CPU kernels are
    #: batch-invariant already, so the CPU keeps one batched pass.
    per_image_vision = True

    def __init__(
        self,
        name: str,
        source: str,
        weights: str = "pretrained",
        config_file: str | None = None,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        device: str = "auto",
        download: bool = False,
        sha256: dict[str, str] | None = None,
        allow_pickle_weights: bool = False,
        text_tower: dict | None = None,
        **_: Any,
    ) -> None:
        if weights not in ("pretrained", "random"):
            raise ConfigError(f"model.weights must be 'pretrained' or 'random', got {weights!r}")
        self.name = name
        self.source = source
        self.weights = weights
        self.config_file = config_file
        self.attn_implementation = attn_implementation
        self.download = download
        self.sha256 = dict(sha256 or {})
        self.allow_pickle_weights = bool(allow_pickle_weights)
        from bench.models.clip_text import text_tower_source

        text_source, self.text_tower_pins = text_tower_source(text_tower)
        self.text_tower_path = None if text_source is None else resolve_source(text_source)[0]
        self.text_tower_config = (text_tower or {}).get("config_file")
        self._clip_text = None
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = None
        self.processor = None

    # ------------------------------------------------------------------ loading
    def fingerprint(self) -> str:
        """Identity of the weights (part of the run id, so retrained weights give new runs).

        Local directories (the embedded model) are hashed by content. Hub models are identified by
        their repo id in the config, not by the cached snapshot, so a run id is the same on a login
        node without weights and on the compute node that has them; the snapshot commit actually
        used goes into the record's provenance (:meth:`weights_revision`).
        """
        if self.weights == "random":
            return "random-init"
        path, local = resolve_source(self.source)
        if not local:
            self.check_weights()
            return "hub"
        self.check_weights()
        return local_fingerprint(path)

    def check_weights(self) -> None:
        """Before any model work: pinned files match their sha256 and pickled weights are opted in.

        Raises :class:`CorruptFileError` (a pin mismatch, naming the file) or :class:`ConfigError` (pickled
        weights without ``model.allow_pickle_weights=true``). Hub files not cached yet are checked after
        the download, in :meth:`load`.
        """
        if self.weights == "random":
            return
        path, local = resolve_source(self.source)
        if local:
            root = Path(path)
            if not root.is_dir():
                return  # load() reports the missing weights
            check_pins(self.name, root, self.sha256)
            pickles = pickle_weights(root)
            if pickles and not self.allow_pickle_weights:
                names = ", ".join(f.name for f in pickles)
                raise ConfigError(
                    f"model {self.name!r}: {path} holds pickled weights ({names}) and no safetensors. Loading a pickle "
                    f"can run code, so it is refused by default; convert the weights to safetensors, or pass "
                    f"model.allow_pickle_weights=true if you trust the files (the record says so)."
                )
            return
        for name, want in self.sha256.items():
            f = _hub_cached_file(path, name)
            if f is not None:  # <cache>/snapshots/<commit>/<name>
                check_pins(self.name, Path(str(f)[: -len(name)]), {name: want})

    def weights_format(self) -> str:
        """``safetensors``, ``pickle`` (opted in with ``model.allow_pickle_weights``), ``random-init`` or, for a
        hub model, ``hub-safetensors`` / ``hub-pickle``: what :meth:`load` reads."""
        if self.weights == "random":
            return "random-init"
        path, local = resolve_source(self.source)
        if local:
            return "pickle" if pickle_weights(Path(path)) else "safetensors"
        return "hub-pickle" if self.allow_pickle_weights and _hub_cached_file(path, "model.safetensors") is None and _hub_cached_file(path, "model.safetensors.index.json") is None else "hub-safetensors"

    def weights_revision(self) -> str:
        """Content hash (local) or snapshot commit (hub) of the weights actually loaded."""
        if self.weights == "random":
            return "random-init"
        path, local = resolve_source(self.source)
        return local_fingerprint(path) if local else hub_fingerprint(path)

    def _architecture_config(self):
        import transformers
        from transformers import AutoConfig

        path, local = resolve_source(self.source)
        if local and (Path(path) / "config.json").exists():
            return AutoConfig.from_pretrained(path)
        if local and self.weights == "pretrained":
            raise MissingWeightsError(self._no_local_weights(path))
        if self.config_file:
            cfile, _ = resolve_source(self.config_file)
            try:
                data = json.loads(Path(cfile).read_text())
            except FileNotFoundError:
                raise ConfigError(f"model.config_file {self.config_file!r} not found at {cfile}") from None
            except json.JSONDecodeError as e:
                raise CorruptFileError(f"model.config_file {cfile} is not valid JSON: {e}") from None
            return getattr(transformers, self.config_class_name)(**data)
        try:
            return AutoConfig.from_pretrained(path, local_files_only=not self.download)
        except OSError:
            raise MissingWeightsError(
                f"no architecture config for {self.source!r} is available offline; set model.config_file or download the model"
            ) from None

    def _no_local_weights(self, path: str) -> str:
        hint = " The embedded model is rebuilt by `python scripts/train_tiny_llava.py`." if self.source.startswith("bench:") else ""
        return f"model {self.name!r}: no weights at {path} (expected config.json and *.safetensors).{hint}"

    def load(self) -> "LlavaAdapter":
        """Load weights (or build random ones) and the processor. Idempotent."""
        if self.model is not None:
            return self
        import transformers
        from transformers import AutoProcessor

        model_class = getattr(transformers, self.model_class_name)

        path, local = resolve_source(self.source)
        if self.weights == "random":
            self.model = build_random_llava(self._architecture_config(), self.device, self.dtype, self.attn_implementation, model_class)
        else:
            if local and not (Path(path) / "config.json").exists():
                raise MissingWeightsError(self._no_local_weights(path))
            try:
                self.model = model_class.from_pretrained(
                    path,
                    dtype=self.dtype,
                    attn_implementation=self.attn_implementation,
                    local_files_only=not self.download,
                    # hub models: safetensors only unless pickles are opted in (local ones are checked in check_weights)
                    use_safetensors=None if (local or self.allow_pickle_weights) else True,
                ).to(self.device)
                if not local and self.sha256:
                    self.check_weights()  # now that the pinned files are in the cache
            except OSError as e:
                msg = str(e)
                if local or "safetensors" in msg.lower() and "header" in msg.lower():
                    raise CorruptFileError(f"model {self.name!r}: cannot read the weights at {path}: {msg.splitlines()[0]}") from None
                raise MissingWeightsError(
                    f"model {self.name!r}: weights for {path!r} are not in the local Hugging Face cache "
                    f"(HF_HOME={_hf_home()}). Download them on a machine with network access with "
                    f"`hf download {path}` (or `huggingface-cli download {path}`), point model.source at a local "
                    f"directory, pass model.download=true to fetch them now, or run an efficiency-only "
                    f"measurement with model.weights=random measure=efficiency."
                ) from None
            except Exception as e:  # safetensors raises its own error types on truncated files
                import pickle

                if isinstance(e, pickle.UnpicklingError) or "weights only load failed" in str(e).lower():
                    # torch.load(weights_only=True) refused a pickle that is not plain tensors: nothing ran
                    raise CorruptFileError(f"model {self.name!r}: the pickled weights at {path} are not plain tensors and were "
                                           f"refused unread ({str(e).splitlines()[0]}); use safetensors weights") from None
                if "safetensor" in type(e).__module__.lower() or "header" in str(e).lower():
                    raise CorruptFileError(f"model {self.name!r}: cannot read the weights at {path}: {e}") from None
                raise
        self.model.eval()
        try:
            self.processor = AutoProcessor.from_pretrained(path, local_files_only=not self.download) if (local or self.weights == "pretrained") else None
        except (OSError, ValueError) as e:
            if self.weights == "pretrained":
                raise MissingWeightsError(f"model {self.name!r}: cannot load the processor from {path}: {e}") from None
            self.processor = None
        if self.processor is not None:
            self.processor.tokenizer.padding_side = "left"
        return self

    # --------------------------------------------------------------- geometry
    @property
    def config(self):
        return self.model.config if self.model is not None else self._architecture_config()

    @property
    def grid(self) -> tuple[int, int]:
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        return (side, side)

    @property
    def has_cls(self) -> bool:
        # CLIP-style towers prepend a class embedding; LLaVA's "default" strategy drops it from the
        # features but it still exists inside the tower (CLS-attention methods need it).
        return getattr(self.config.vision_config, "model_type", "") in ("clip_vision_model", "clip")

    @property
    def num_llm_layers(self) -> int:
        return self.config.text_config.num_hidden_layers

    @property
    def image_token_id(self) -> int:
        cfg = self.config
        return getattr(cfg, "image_token_id", None) or cfg.image_token_index

    @property
    def pad_token_id(self) -> int:
        if self.processor is not None and self.processor.tokenizer.pad_token_id is not None:
            return self.processor.tokenizer.pad_token_id
        pad = getattr(self.config, "pad_token_id", None) or getattr(self.config.text_config, "pad_token_id", None)
        return 0 if pad is None else pad

    def check_method(self, method: PruningMethod) -> None:
        """Refuse methods this model cannot run (stage not implemented, missing CLS, no CLIP text tower, ...)."""
        if method.stage not in self.supported_stages:
            raise IncompatibleMethodError(
                f"method {method.name!r} prunes at stage {method.stage!r}, which {type(self).__name__} does not implement yet"
            )
        self.check_text_tower(method)
        method.check_compatible(VisionContext(self.grid, self.has_cls, torch.zeros(1, dtype=torch.long)))
        if method.stage == "in_llm":  # a budget no schedule reaches on this LLM's depth: refused before any model work
            method.check_budget(self.grid[0] * self.grid[1], self.num_llm_layers)

    # --------------------------------------------------------------- CLIP text side (CDPruner)
    def check_text_tower(self, method: PruningMethod) -> None:
        """Before any model work: a method that asks for CLIP's text side needs ``model.text_tower`` set, its local
        files present and matching their pins (exit 2 otherwise, naming what is missing)."""
        from bench.models.clip_text import needs_text

        if not needs_text(method):
            return
        if self.text_tower_path is None:
            raise IncompatibleMethodError(
                f"method {method.name!r} scores tokens against the question with CLIP's text tower, but model {self.name!r} "
                f"has none (model.text_tower is null); set model.text_tower.source to the CLIP checkpoint of its vision tower"
            )
        if self.weights == "random":
            return
        _, local = resolve_source(self.text_tower_path)
        root = Path(self.text_tower_path)
        if local and not (root / "config.json").is_file():
            raise MissingWeightsError(
                f"model {self.name!r}: no CLIP text tower at {root} (model.text_tower.source); method {method.name!r} needs it."
                + (" The embedded one is rebuilt by `python scripts/train_tiny_clip_text.py`." if "tiny-llava-synth" in str(root) else "")
            )
        if local:
            check_pins(f"{self.name}.text_tower", root, self.text_tower_pins)
        elif not self.download and _hub_cached_file(self.text_tower_path, "config.json") is None:
            raise MissingWeightsError(
                f"model {self.name!r}: the CLIP text tower {self.text_tower_path!r} (model.text_tower.source) is not in the local "
                f"Hugging Face cache (HF_HOME={_hf_home()}); method {method.name!r} needs it. Download it with "
                f"`hf download {self.text_tower_path}`, pass model.download=true, or run model.weights=random measure=efficiency."
            )

    def clip_text(self):
        """The :class:`bench.models.clip_text.ClipTextSide` of ``model.text_tower`` (loaded on first use)."""
        if self._clip_text is None:
            if self.text_tower_path is None:
                raise IncompatibleMethodError(f"model {self.name!r} has no CLIP text tower (model.text_tower is null)")
            from bench.models.clip_text import ClipTextSide

            if self.weights == "random":
                self._clip_text = ClipTextSide.random(self._text_tower_architecture(), self.config.vision_config.hidden_size, self.device)
            else:
                self._clip_text = ClipTextSide(self.text_tower_path, self.device, self.download)
        return self._clip_text.load()

    def _text_tower_architecture(self):
        """The text tower's ``CLIPConfig`` for ``weights=random``: its local ``config.json``, else ``model.text_tower.config_file``."""
        from transformers import CLIPConfig

        root = Path(self.text_tower_path)
        if (root / "config.json").is_file():
            return CLIPConfig.from_pretrained(root)
        if not self.text_tower_config:
            raise MissingWeightsError(f"model {self.name!r}: weights=random needs model.text_tower.config_file (the CLIP architecture) "
                                      f"for a text tower that is not available locally ({self.text_tower_path})")
        cfile, _ = resolve_source(str(self.text_tower_config))
        try:
            return CLIPConfig(**json.loads(Path(cfile).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"model.text_tower.config_file {self.text_tower_config!r} not found at {cfile}") from None

    def text_tower_fingerprint(self) -> str:
        """Identity of the text tower's weights (content hash of a local directory, else the hub id)."""
        if self.text_tower_path is None:
            return "none"
        if self.weights == "random":
            return "random-init"
        _, local = resolve_source(self.text_tower_path)
        return local_fingerprint(self.text_tower_path) if local else f"hub:{self.text_tower_path}"

    #: the synthetic probe question of :meth:`probe_batch` (``batch["texts"]``, read by question-conditioned methods):
    #: one 77-token chunk, as almost every benchmark question
    PROBE_QUESTION = "What is the colour of the object at the centre of the image?"

    #: the synthetic probe prompt: text tokens before and after the image (60 in all, methods.md's worked
    #: example) and the ids they are drawn from (below the tokenizer's added tokens, 32000 = ``<image>``)
    PROBE_TEXT = (35, 25)
    PROBE_VOCAB = 32000

    def probe_batch(self, batch_size: int = 1, seed: int = 0, size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """LLaVA-1.5-shaped synthetic prompt: :attr:`PROBE_TEXT` seeded random text ids around one image's
        ``N`` placeholders, and seeded random pixels at the tower's resolution. Costs and latency do not
        depend on the values, so methods compared on it see identical work. ``size``: the tower's own
        resolution only (the processor resizes every image to it)."""
        g = torch.Generator().manual_seed(seed)
        cfg = self.config
        side = cfg.vision_config.image_size
        if size is not None and tuple(size) != (side, side):
            raise ConfigError(f"model {self.name!r} encodes every image at {side}x{side}; a probe of {size[0]}x{size[1]} is not its input")
        n = self.grid[0] * self.grid[1]
        before, after = self.PROBE_TEXT
        text = torch.randint(3, min(cfg.text_config.vocab_size, self.PROBE_VOCAB), (before + after,), generator=g)
        text[text == self.image_token_id] = 3
        ids = torch.cat([text[:before], torch.full((n,), self.image_token_id), text[before:]]).unsqueeze(0).repeat(batch_size, 1)
        pix = torch.randn(1, 3, side, side, generator=g).repeat(batch_size, 1, 1, 1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pix, "texts": [self.PROBE_QUESTION] * batch_size}

    def visual_layout(self, batch: dict[str, torch.Tensor]) -> list[list[ImageBlock]]:
        """One contiguous block of ``N`` image tokens per sample on the square :attr:`grid`."""
        out = []
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            seq = ids[mask.bool()]
            pos = (seq == self.image_token_id).nonzero().flatten()
            out.append([ImageBlock(int(pos[0]), len(pos), [self.grid])] if len(pos) else [])
        return out

    def is_llama_rms_norm(self, norm: torch.nn.Module) -> bool:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        return type(norm) is LlamaRMSNorm

    def flops_description(self) -> FlopsDescription:
        vc, tc = self.config.vision_config, self.config.text_config
        heads = tc.num_attention_heads
        return FlopsDescription(
            family=self.family,
            vision_layers=vc.num_hidden_layers,
            vision_width=vc.hidden_size,
            vision_mlp=vc.intermediate_size,
            vision_tokens_per_tile=(vc.image_size // vc.patch_size) ** 2 + (1 if self.has_cls else 0),
            vision_window=0,
            vision_full_layers=tuple(range(vc.num_hidden_layers)),
            projector="mlp2x_gelu",
            llm_layers=tc.num_hidden_layers,
            llm_width=tc.hidden_size,
            llm_mlp=tc.intermediate_size,
            llm_heads=heads,
            llm_kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
            llm_head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
            vocab=tc.vocab_size,
            vision_patch_dim=vc.num_channels * vc.patch_size**2,
            vision_heads=vc.num_attention_heads,
            vision_cls=1 if self.has_cls else 0,
            vision_mlp_matrices=2,
            vision_merge=1,
            # LLaVA's mlp2x_gelu: vision width -> LLM width -> LLM width
            projector_dims=((vc.hidden_size, tc.hidden_size), (tc.hidden_size, tc.hidden_size)),
        )

    def vision_stage(self, batch: dict[str, torch.Tensor]):
        return self.encode_images(batch["pixel_values"])

    def selection_stage(self, batch: dict[str, torch.Tensor], method: PruningMethod, sample_seeds: torch.Tensor):
        if not (method.stage == "pre_llm" or getattr(method, "pre_llm_selection", False)):
            return None
        needs = bool(method.needs)
        enc = self.encode_images(batch["pixel_values"], output_hidden_states=needs)
        feats, hidden = enc if needs else (enc, None)
        ctx = self.vision_context(sample_seeds, hidden, method.needs, batch.get("texts"))
        return lambda: method.reduce(feats, ctx)

    # --------------------------------------------------------------- forward
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, output_hidden_states: bool = False, project: bool = True):
        """``(B, 3, H, W)`` pixels -> ``(B, N, D_llm)`` projected visual tokens (CLS dropped).

        On CUDA one image at a time (:attr:`per_image_vision`), so a sample's features do not depend on
        its batch neighbours; with :attr:`selection_graphs` each image's pass is replayed from a CUDA
        graph captured at batch 1 (:meth:`vision_tower_per_image`).

        With ``output_hidden_states`` returns ``(features, hidden_states)`` where ``hidden_states`` is
        the vision tower's tuple of ``(B, 1 + N, D_vis)`` tensors (embeddings, then every layer's
        output), from the same forward pass. ``project=False`` (with ``output_hidden_states``) runs the tower
        alone: features are ``None`` (methods that project their own tokens, ``projects_own_tokens``).
        """
        px = pixel_values.to(self.device, self.dtype)
        if self.per_image_vision and self.device.type == "cuda":
            return self.vision_tower_per_image(px, output_hidden_states, project)
        return self._vision_tower(px, output_hidden_states, project)

    def vision_tower_per_image(self, px: torch.Tensor, output_hidden_states: bool = False, project: bool = True):
        """:meth:`encode_images` one image at a time: ``(B, 3, H, W)`` on the device -> the batched result.

        A batch-1 tower pass at 7B scale is ~300 kernel launches of small GEMMs; eager, its cost is
        launch and Python dispatch (about 9 ms per image on an H100), which would eat most of what
        batching gains. On CUDA with :attr:`selection_graphs` the pass is captured once per input
        shape (``methods.base.CudaGraphCache``) and replayed per image: the same kernels, so the
        features are the ones a batch-1 call gets, bit for bit.
        """
        run = self._tower_graph(output_hidden_states, project) if self._graphs_on() else (lambda p: self._vision_tower(p, output_hidden_states, project))
        parts = [run(px[i : i + 1]) for i in range(px.shape[0])]
        if len(parts) == 1:
            return parts[0]
        if not output_hidden_states:
            return torch.cat(parts)
        hidden = tuple(torch.cat(layer) for layer in zip(*(h for _, h in parts)))
        return (torch.cat([f for f, _ in parts]) if project else None), hidden

    def _tower_graph(self, output_hidden_states: bool, project: bool = True):
        from methods.base import CudaGraphCache

        return self.cached_graph(("vision_tower", bool(output_hidden_states), bool(project)),
                                 lambda: CudaGraphCache(lambda p: self._vision_tower(p, output_hidden_states, project)))

    def _vision_tower(self, px: torch.Tensor, output_hidden_states: bool, project: bool = True):
        """One eager tower + projector pass over the whole batch ``px`` (device, model dtype); ``project=False``:
        the tower alone, ``(None, hidden_states)`` (every layer's output, as ``get_image_features`` records them)."""
        cfg = self.model.config
        if not project:
            out = self.model.model.vision_tower(px, output_hidden_states=True, return_dict=True)
            return None, tuple(out.hidden_states)
        out = self.model.model.get_image_features(
            pixel_values=px,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
            # transformers >= 5.2x records only the feature layer unless every hidden state is asked for
            **({"output_hidden_states": True} if output_hidden_states else {}),
        )
        feats = out.pooler_output
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        return (feats, tuple(out.hidden_states)) if output_hidden_states else feats

    def vision_context(self, sample_seeds: torch.Tensor, hidden_states=None, needs: frozenset[str] = frozenset(),
                       texts: list[str] | None = None) -> VisionContext:
        """The :class:`VisionContext` for a batch; ``extras`` serve what the method ``needs``.

        Vision-tower quantities (CLS attention rows, keys, layer features) are computed by
        ``bench.models.clip_extras.build_extras`` from the hidden states of the same forward pass; CLIP's
        joint-space quantities (``clip_*``) by ``bench.models.clip_text`` from them and ``texts`` (the batch's
        user texts, ``batch["texts"]``).
        """
        extras = {}
        if needs:
            from bench.models.clip_extras import build_extras, vision_model
            from bench.models.clip_text import TEXT_KEYS, build_text_extras

            extras = build_extras(self.model, hidden_states, needs)
            if any(k in TEXT_KEYS for k in needs):
                extras.update(build_text_extras(self.clip_text(), vision_model(self.model), hidden_states,
                                                self.config.vision_feature_layer, texts, needs))
        return VisionContext(grid=self.grid, has_cls=self.has_cls, sample_seeds=sample_seeds, extras=extras)

    def visual_selection(self, pixel_values: torch.Tensor, method: PruningMethod, sample_seeds: torch.Tensor, texts: list[str] | None = None):
        """Run the vision side and the method: ``(B, 3, H, W)`` -> :class:`VisualSelection`.

        ``in_vision`` methods (ToMe) merge inside the CLIP layers (``bench.models.vision_merge``);
        ``in_llm`` methods keep every visual token here and prune inside the LLM instead, unless they also
        select before it (``pre_llm_selection``, VScan): their ``reduce`` runs here, their stages later.
        """
        from methods.base import VisualSelection

        if method.stage == "in_vision" and hasattr(method, "after_block"):
            from bench.models.vision_prune import encode_with_pruning

            return encode_with_pruning(self, pixel_values, method)
        if method.stage == "in_vision":
            from bench.models.vision_merge import encode_with_merging

            return encode_with_merging(self, pixel_values, method, sample_seeds, graphs=self._graphs_on())
        own = method.stage == "pre_llm" and method.projects_own_tokens
        if method.needs:
            feats, hidden = self.encode_images(pixel_values, output_hidden_states=True, project=not own)
        else:
            feats, hidden = self.encode_images(pixel_values), None
        n = self.grid[0] * self.grid[1]
        if own:  # the method projects the tokens it keeps: no projector on all N (its reduce reads the shape only)
            feats = self.feature_placeholder(pixel_values.shape[0])
        if feats.shape[1] != n:
            raise IncompatibleMethodError(f"vision tower returned {feats.shape[1]} tokens, expected the {self.grid} grid")
        if method.stage == "in_llm" and not getattr(method, "pre_llm_selection", False):
            b = feats.shape[0]
            return VisualSelection(feats, torch.arange(n, device=feats.device).expand(b, n), torch.full((b,), n, dtype=torch.long))
        if self.replays_selection(method):
            return self.graphed_selection(method)(feats, hidden)
        return method.reduce(feats, self.vision_context(sample_seeds, hidden, method.needs, texts))

    def feature_placeholder(self, b: int) -> torch.Tensor:
        """``(B, N, D_llm)`` zeros of the model's dtype without memory (an expanded scalar): the projected
        features' shape for a method that projects its own tokens (``projects_own_tokens``)."""
        n = self.grid[0] * self.grid[1]
        return torch.zeros((), dtype=self.dtype, device=self.device).expand(b, n, self.config.text_config.hidden_size)

    def replays_selection(self, method: PruningMethod) -> bool:
        """Whether :meth:`visual_selection` replays ``method``'s pre-LLM selection from a CUDA graph."""
        return self._graphs_on() and method.stage == "pre_llm" and method.graph_safe and method.prune_ratio > 0

    def graphed_selection(self, method: PruningMethod):
        """The CUDA-graph replay of ``method``'s extras + selection (built once per method configuration and
        cached on the adapter); call it as ``(feats (B, N, D), hidden) -> VisualSelection``."""
        from bench.models.clip_extras import GraphedSelection

        key = (type(method).__name__, repr(method.describe()))
        return self.cached_graph(key, lambda: GraphedSelection(self.model, method, self.grid, self.has_cls))

    def cached_graph(self, key, make):
        """The graph replayer cached on the adapter under ``key``, built by ``make()`` on first use (graphs
        hold their captured memory, so each configuration is captured once per adapter)."""
        cache = self.__dict__.setdefault("_graph_cache", {})
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def _graphs_on(self) -> bool:
        return self.selection_graphs and self.device.type == "cuda"

    @torch.no_grad()
    def prepare(self, batch: dict[str, torch.Tensor], method: PruningMethod, sample_seeds: torch.Tensor) -> PreparedBatch:
        """Apply a pre-LLM ``method`` to a processor batch (one image per sample, left padded).

        ``batch`` holds ``input_ids``/``attention_mask`` ``(B, T)`` with ``N`` image tokens per sample
        and ``pixel_values`` ``(B, 3, H, W)``.
        """
        ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu()
        b = ids.shape[0]
        n = self.grid[0] * self.grid[1]
        texts = batch.get("texts")
        sel = self.visual_selection(batch["pixel_values"], method, sample_seeds, texts)
        feats = [sel.features[i, : int(sel.n_kept[i])] for i in range(b)]
        new_ids, new_mask, embeds, spans = self.assemble(ids, mask, [n] * b, feats)
        kept = [int(f.shape[0]) for f in feats]
        extras = {"image_spans": spans, "sample_seeds": sample_seeds}
        if "vision_tokens_per_layer" in sel.extras:
            extras["vision_tokens_per_layer"] = sel.extras["vision_tokens_per_layer"]
        if self.text_tower_path is not None and method.prune_ratio > 0 and texts is not None:
            from bench.models.clip_text import needs_text

            if needs_text(method):  # what the text side cost (the analytic FLOPs model reads it)
                extras["clip_text"] = self.clip_text_costs(texts)
        if original_positions(method, sel):
            extras["position_ids"] = kept_position_ids(ids, mask, sel.kept_index.cpu(), kept, self.image_token_id, n, new_ids.shape[1]).to(self.device)
        return PreparedBatch(new_ids, embeds, new_mask, [n] * b, kept, extras=extras)

    def clip_text_costs(self, texts: list[str]) -> dict:
        """Per batch: each question's 77-token chunks, the text tower's FLOPs on them, CLIP's joint width."""
        from bench.models.clip_text import question_text

        side = self.clip_text()
        chunks = [(len(side.tokenizer(text=question_text(t))["input_ids"]) - 1) // side.max_position_embeddings + 1 for t in texts]
        return {"chunks": chunks, "tower_flops": sum(side.tower_flops(c) for c in chunks), "projection_dim": side.projection_dim}

    def assemble(self, ids: torch.Tensor, mask: torch.Tensor, n_in: list[int], feats: list[torch.Tensor]):
        """Rebuild left-padded prompts around the kept visual features.

        ``ids``/``mask`` ``(B, T)`` (CPU) hold sample ``i``'s image as ``n_in[i]`` contiguous placeholder tokens;
        ``feats[i]`` ``(K_i, D)`` replaces them. Returns ``(input_ids, attention_mask, inputs_embeds, image_spans)``
        on the device; ``image_spans`` ``(B, 2)`` is where each sample's visual block sits in the padded sequence
        (in-LLM methods prune there). Positions are renumbered contiguously (``generate``'s cumulative mask).
        """
        img = self.image_token_id
        b = ids.shape[0]
        rows = []
        for i in range(b):
            seq = ids[i][mask[i].bool()]
            pos = (seq == img).nonzero().flatten()
            n = n_in[i]
            if len(pos) != n or (len(pos) and pos[-1] - pos[0] + 1 != n):
                raise ValueError(f"sample {i}: expected one image of {n} contiguous image tokens, found {len(pos)}")
            start = int(pos[0])
            rows.append(torch.cat([seq[:start], torch.full((int(feats[i].shape[0]),), img, dtype=seq.dtype), seq[start + n :]]))
        t = max(len(r) for r in rows)
        new_ids = torch.full((b, t), self.pad_token_id, dtype=ids.dtype)
        new_mask = torch.zeros((b, t), dtype=mask.dtype)
        for i, r in enumerate(rows):  # left padding, as the processor does
            new_ids[i, t - len(r) :] = r
            new_mask[i, t - len(r) :] = 1
        new_ids, new_mask = new_ids.to(self.device), new_mask.to(self.device)
        embeds = self.model.get_input_embeddings()(new_ids)
        vis = torch.cat(list(feats)).to(embeds.device, embeds.dtype)
        slot = (new_ids == img) & new_mask.bool()
        embeds = embeds.masked_scatter(slot.unsqueeze(-1), vis)
        starts = [t - len(r) + int((r == img).nonzero()[0]) for r in rows]
        spans = torch.tensor([[s0, s0 + int(f.shape[0])] for s0, f in zip(starts, feats)], dtype=torch.long)
        return new_ids, new_mask, embeds, spans

    def llm_pruning(self, method: PruningMethod, prepared: PreparedBatch):
        """Context manager that applies an ``in_llm`` method inside the decoder layers.

        Hooks are installed on entry and removed in ``finally``; for other stages it does nothing.
        Implemented in ``bench.models.llm_pruning`` (layer hooks: hidden states, positions, mask and
        KV cache of later layers hold only the kept tokens).
        """
        import contextlib

        if method.stage != "in_llm":
            return contextlib.nullcontext(None)
        from bench.models.llm_pruning import prune_in_llm

        return prune_in_llm(self, method, prepared)

    def generate(self, prepared: PreparedBatch, max_new_tokens: int = 16, method: PruningMethod | None = None, **gen_kwargs) -> torch.Tensor:
        """Greedy generation from pruned inputs; returns ``(B, T_new)`` new token ids."""
        if method is not None and method.stage == "in_llm":
            with self.llm_pruning(method, prepared):
                return self.generate(prepared, max_new_tokens=max_new_tokens, **gen_kwargs)
        tok = self.processor.tokenizer if self.processor is not None else None
        if "position_ids" in prepared.extras:  # original ids kept (G-Prune); generate continues at last + 1
            gen_kwargs = {"position_ids": prepared.extras["position_ids"], **gen_kwargs}
        out = self.model.generate(
            input_ids=prepared.input_ids,
            inputs_embeds=prepared.inputs_embeds,
            attention_mask=prepared.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_token_id,
            eos_token_id=tok.eos_token_id if tok is not None else None,
            **gen_kwargs,
        )
        return out[:, prepared.input_ids.shape[1] :]

    @torch.no_grad()
    def prefill(self, prepared: PreparedBatch, method: PruningMethod | None = None):
        """One LLM prefill with the KV cache on; returns the model output (``past_key_values`` set).

        Position ids follow ``generate``'s rule (cumulative sum of the attention mask), so the
        measured prefill is the one generation runs.
        """
        if method is not None and method.stage == "in_llm":
            with self.llm_pruning(method, prepared):
                return self.prefill(prepared)
        pos = prepared.extras.get("position_ids")
        if pos is None:
            pos = (prepared.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.model(
            inputs_embeds=prepared.inputs_embeds,
            attention_mask=prepared.attention_mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
        )


def original_positions(method: PruningMethod, sel) -> bool:
    """Whether a pre-LLM selection keeps its tokens' original position ids (``renumber_positions: false``,
    G-Prune's official behaviour) instead of the contiguous ids of LLaVA's own code."""
    return method.stage == "pre_llm" and getattr(method, "renumber_positions", True) is False and sel.kept_index is not None


def kept_position_ids(ids: torch.Tensor, mask: torch.Tensor, kept_index: torch.Tensor, kept: list[int], img: int, n: int, t: int) -> torch.Tensor:
    """``(B, t)`` left-padded position ids of the pruned rows as they were in the unpruned prompt ``ids``/``mask``
    ``(B, T)``: text before the image as is, kept image token ``j`` at ``start + j``, the text after it at its
    old place."""
    out = torch.zeros(ids.shape[0], t, dtype=torch.long)
    for i, k in enumerate(kept):
        seq = ids[i][mask[i].bool()]
        start = int((seq == img).nonzero()[0])
        after = len(seq) - start - n
        pos = torch.cat([torch.arange(start), start + kept_index[i, :k].long(), start + n + torch.arange(after)])
        out[i, t - len(pos) :] = pos
    return out


def chat_prompt(processor, text: str) -> str:
    """One image followed by ``text`` in a user turn, rendered with the processor's chat template and
    the generation prompt (LLaVA-1.5: ``USER: <image>\n{text} ASSISTANT:``)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def build_random_llava(config, device, dtype: torch.dtype, attn_implementation: str = "sdpa", model_class=None):
    """The real architecture of ``config`` with random weights, built directly on ``device`` in ``dtype``.

    Compute cost, latency and KV-cache size do not depend on weight values, so efficiency measured
    on it is real; accuracy is not (records say so).
    """
    if model_class is None:
        from transformers import LlavaForConditionalGeneration as model_class

    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = attn_implementation
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return model_class(config).eval()
    finally:
        torch.set_default_dtype(prev)


def kv_cache_bytes(cache) -> list[int]:
    """Bytes held by each layer's keys and values in a transformers cache (:meth:`ModelAdapter.kv_cache_bytes`)."""
    return ModelAdapter.kv_cache_bytes(cache)


def _hf_home() -> str:
    import os

    return os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
