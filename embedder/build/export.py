"""Export a model's sentence-embedding pipeline to one ONNX graph and validate it.

The only module that imports torch and transformers' modeling code; the cache imports it lazily,
on a miss.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import time
import warnings
from pathlib import Path

from embedder.config import ExportOptions
from embedder.errors import ExportError, UnsupportedModelError
from embedder.infer.graph_info import read_graph_info
from embedder.model.spec import ModelSpec, Pooling

logger = logging.getLogger(__name__)

GRAPH_FILE = "model.onnx"
FUSED_FILE = "model.cuda.onnx"
TOKENIZER_FILE = "tokenizer.json"
OUTPUT_NAME = "sentence_embedding"
AXES = {0: "batch", 1: "sequence"}
# Validation thresholds for fp32: ONNX Runtime against the PyTorch wrapper on the same batch.
MAX_ABS_DIFF = 1e-4
MIN_COSINE = 0.99999

# Real sentences of different lengths; the trace uses two, validation three others.
_TRACE_TEXTS = ["Exporting traces the model once.", "Rows are padded."]
_CHECK_TEXTS = [
    "A",
    "Validation runs the graph at a batch size and sequence lengths the trace never saw.",
    "The quick brown fox jumps over the lazy dog; the graph must accept any batch and any length "
    "up to the maximum sequence length, with padding masked out of the pooling.",
]


def _require_torch():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ExportError(
            f"exporting a graph needs torch and transformers ({e}); install them "
            "(pip install 'torch==2.13.0' transformers) or point --cache-dir at a cache that holds the graph"
        ) from e
    transformers.utils.logging.disable_progress_bar()  # per-tensor loading bars are noise in job logs
    return torch, transformers


def _pool(torch, tokens, mask, modes: tuple[Pooling, ...], pooler_output):
    """Pool right-padded token vectors exactly as sentence-transformers' Pooling does."""
    mask_f = mask.unsqueeze(-1).to(tokens.dtype)
    vectors = []
    for mode in modes:
        if mode is Pooling.CLS:
            vectors.append(tokens[:, 0])
        elif mode is Pooling.MAX:
            vectors.append(tokens.masked_fill(mask_f == 0, float("-inf")).max(dim=1).values)
        elif mode in (Pooling.MEAN, Pooling.MEAN_SQRT_LEN):
            summed = (tokens * mask_f).sum(dim=1)
            counts = torch.clamp(mask_f.sum(dim=1), min=1e-9)
            vectors.append(summed / (counts if mode is Pooling.MEAN else torch.sqrt(counts)))
        elif mode is Pooling.WEIGHTED_MEAN:
            positions = torch.cumsum(torch.ones_like(mask_f), dim=1)  # 1..T, stays symbolic in the trace
            weights = mask_f * positions
            vectors.append((tokens * weights).sum(dim=1) / torch.clamp(weights.sum(dim=1), min=1e-9))
        elif mode is Pooling.LAST_TOKEN:
            last = (mask.sum(dim=1) - 1).clamp(min=0).to(torch.int64)
            index = last.view(-1, 1, 1).expand(-1, 1, tokens.shape[-1])
            vectors.append(torch.gather(tokens, 1, index)[:, 0])  # squeeze(1) would export an If on the shape
        elif mode is Pooling.POOLER:
            vectors.append(pooler_output)
    return torch.cat(vectors, dim=-1) if len(vectors) > 1 else vectors[0]


def _load_transformer(torch, transformers, spec: ModelSpec):
    try:
        # Eager attention exports as plain MatMul/Softmax, which every onnxruntime provider runs.
        transformer = transformers.AutoModel.from_pretrained(
            str(spec.transformer_dir), attn_implementation="eager", dtype=torch.float32
        )
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(f"cannot load {spec.name} with transformers: {e}") from e
    return transformer.eval()


def _build_wrapper(torch, transformer, spec: ModelSpec, options: ExportOptions, input_names: list[str]):
    nn = torch.nn
    activations = {"tanh": nn.Tanh, "identity": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}
    dense_layers = []
    for dense in spec.dense:
        linear = nn.Linear(dense.in_features, dense.out_features, bias=dense.bias)
        state = _load_dense_state(torch, dense.path)
        try:
            linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
        except RuntimeError as e:
            raise UnsupportedModelError(f"Dense weights in {dense.path} do not fit the layer: {e}") from e
        dense_layers.append(nn.Sequential(linear, activations[dense.activation]()))

    modes, normalize = spec.pooling, options.normalize

    class SentenceEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = transformer
            self.dense = nn.ModuleList(dense_layers)

        def forward(self, *tensors):
            features = dict(zip(input_names, tensors))
            out = self.transformer(**features, return_dict=True)
            pooler_output = getattr(out, "pooler_output", None) if Pooling.POOLER in modes else None
            vector = _pool(torch, out.last_hidden_state, features["attention_mask"], modes, pooler_output)
            for layer in self.dense:
                vector = layer(vector)
            if normalize:
                vector = torch.nn.functional.normalize(vector, p=2.0, dim=1)
            return vector

    if Pooling.POOLER in modes and getattr(transformer, "pooler", None) is None:
        raise UnsupportedModelError(f"--pooling pooler: {spec.model_type} model {spec.name} has no pooler layer")
    return SentenceEncoder().eval()


def _load_dense_state(torch, folder: Path) -> dict:
    safetensors_file = folder / "model.safetensors"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors_file))
    bin_file = folder / "pytorch_model.bin"
    if bin_file.is_file():
        return torch.load(str(bin_file), map_location="cpu", weights_only=True)
    raise UnsupportedModelError(f"Dense module {folder} has no model.safetensors or pytorch_model.bin")


def _load_tokenizer(transformers, spec: ModelSpec):
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(spec.transformer_dir))
    except Exception as e:
        raise UnsupportedModelError(f"cannot load the tokenizer of {spec.name}: {e}") from e
    if not getattr(tokenizer, "is_fast", False):
        raise UnsupportedModelError(f"{spec.name} has no fast tokenizer; the job needs a tokenizer.json")
    backend = tokenizer.backend_tokenizer
    if spec.do_lower_case:
        # sentence_bert_config.json asks for lowercasing: put it in the tokenizer itself, as
        # sentence-transformers does, so the runner needs no extra step.
        from tokenizers import normalizers

        existing = [backend.normalizer] if backend.normalizer is not None else []
        backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), *existing])
    # The runner sets truncation and padding itself; a tokenizer.json may carry other defaults.
    backend.no_truncation()
    backend.no_padding()
    return tokenizer, backend


def _input_names(transformer_forward, tokenizer) -> list[str]:
    params = inspect.signature(transformer_forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in params and "token_type_ids" in tokenizer.model_input_names:
        names.append("token_type_ids")
    return names


def _encode(backend, texts: list[str], max_len: int, pad_id: int):
    """Right-padded int64 arrays, the layout the job feeds the graph."""
    import numpy as np

    backend.enable_truncation(max_len)
    encodings = backend.encode_batch(texts)
    backend.no_truncation()
    width = max(len(e.ids) for e in encodings)
    ids = np.full((len(texts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(texts), width), dtype=np.int64)
    for row, enc in enumerate(encodings):
        ids[row, : len(enc.ids)] = enc.ids
        mask[row, : len(enc.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def export_graph(spec: ModelSpec, options: ExportOptions, out_dir: Path) -> dict:
    """Write the entry's graphs (model.onnx, model.cuda.onnx where fused) and tokenizer.json into out_dir,
    validate them, return manifest fields; `graphs` in them names the file for each device kind."""
    torch, transformers = _require_torch()
    import numpy as np

    started = time.perf_counter()
    torch.manual_seed(0)
    tokenizer, backend = _load_tokenizer(transformers, spec)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    transformer = _load_transformer(torch, transformers, spec)
    input_names = _input_names(transformer.forward, tokenizer)
    wrapper = _build_wrapper(torch, transformer, spec, options, input_names)

    # Batch of two with a padded row: no axis can be specialised to the trace's shape.
    trace = _encode(backend, _TRACE_TEXTS, spec.max_seq_length, pad_id)
    args = tuple(torch.from_numpy(trace[n]) for n in input_names)
    graph_path = out_dir / GRAPH_FILE
    dynamic_axes = {name: AXES for name in input_names} | {OUTPUT_NAME: {0: "batch"}}
    # The TorchScript exporter (dynamo=False) writes one self-contained file (hashable as a whole)
    # and its graph ran faster in onnxruntime than the dynamo exporter's.
    with torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings about Python-side branches are expected; validation below runs the
        # graph at other shapes and catches any branch that the trace froze wrongly.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                wrapper,
                args,
                str(graph_path),
                input_names=input_names,
                output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic_axes,
                opset_version=options.opset,
                do_constant_folding=True,
                dynamo=False,
            )
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed for {spec.name}: {type(e).__name__}: {e}") from e
    _fix_output_dim(graph_path, spec.dim)
    backend.save(str(out_dir / TOKENIZER_FILE))

    info = read_graph_info(graph_path)
    _check_interface(info, input_names, spec.dim)
    import onnx

    try:
        onnx.checker.check_model(str(graph_path), full_check=True)
    except Exception as e:
        raise ExportError(f"onnx checker rejected the graph of {spec.name}: {e}") from e

    def validate(path: Path) -> dict:
        return _validate(torch, wrapper, path, backend, input_names, spec, pad_id, np)

    @functools.cache
    def gate_feeds() -> list[dict]:
        from embedder.build.gate import gate_texts

        return _batches_of(gate_texts(), backend, spec, pad_id, input_names)

    def gate_vectors(path: Path, kind: str):
        return _run_graph(path, gate_feeds(), kind)

    validation = validate(graph_path)
    fused_path = out_dir / FUSED_FILE
    if options.precision == "int8":
        optimization = {"applied": False, "reason": "int8 quantizes the plain graph, the one the CPU runs"}
    else:
        optimization = _optimize(graph_path, fused_path, spec, transformer.config, validate)
    # The plain graph is for the CPU: there onnxruntime's own session optimizer makes it faster than
    # the offline-fused one at the CPU's batch sizes. The fused one (Attention) is for CUDA.
    graphs = {"cpu": GRAPH_FILE, "cuda": FUSED_FILE if optimization["applied"] else GRAPH_FILE}
    cpu_rewrite = None if options.precision == "fp16" else _rewrite_for_cpu(graph_path, spec, validate)
    quantization = half = None
    if options.precision == "int8":
        from embedder.build.quantize import quantize_int8

        quantization = quantize_int8(
            graph_path, lambda texts, size: _batches_of(texts, backend, spec, pad_id, input_names, size))
        graphs = {"cpu": GRAPH_FILE}
    elif options.precision == "fp16":
        from embedder.build.half import convert_fp16

        source = out_dir / graphs["cuda"]
        half = convert_fp16(source, graph_path, gate_vectors)
        graphs = {"cuda": GRAPH_FILE}
    for name in set(graphs.values()):
        _check_interface(read_graph_info(out_dir / name), input_names, spec.dim)
    if FUSED_FILE not in graphs.values():
        fused_path.unlink(missing_ok=True)
    return {
        "graphs": graphs,
        "optimization": optimization,
        "cpu_rewrite": cpu_rewrite,
        "quantization": quantization,
        "fp16": half,
        "inputs": [t.to_dict() for t in info.inputs],
        "outputs": [t.to_dict() for t in info.outputs],
        "pad_token_id": int(pad_id),
        "validation": validation,
        "exporter": {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__},
        "export_seconds": round(time.perf_counter() - started, 3),
    }


# Encoder families whose graphs onnxruntime's transformer optimizer fuses as "bert".
_FUSABLE = {"bert", "roberta", "xlm-roberta", "distilbert", "camembert", "electra", "mpnet"}


def _optimize(graph_path: Path, fused_path: Path, spec: ModelSpec, config, validate) -> dict:
    """Write an offline-fused copy (Attention, LayerNorm, GELU) to fused_path if it validates too.

    onnxruntime's session optimizer does not fuse Attention or EmbedLayerNormalization; its offline
    transformer optimizer does, on the eager-attention export. A fusion that changes the numbers
    (or fails) writes nothing: the plain graph, still exact, serves every provider.
    """
    if spec.model_type not in _FUSABLE:
        return {"applied": False, "reason": f"no fusion recipe for model type {spec.model_type!r}"}
    try:
        from onnxruntime.transformers import optimizer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Attention fuses only when told the head count (left to detection, it was not found).
            heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads", 0)
            hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", 0)
            model = optimizer.optimize_model(str(graph_path), model_type="bert", num_heads=heads, hidden_size=hidden,
                                             opt_level=0)
        fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
        model.save_model_to_file(str(fused_path))
        validation = validate(fused_path)
    except Exception as e:  # the plain graph stays: correct, only slower
        fused_path.unlink(missing_ok=True)
        logger.warning("graph fusion skipped for %s: %s", spec.name, e)
        return {"applied": False, "reason": f"{type(e).__name__}: {e}"}
    return {"applied": True, "fused_operators": fused, "validation": validation}


def _rewrite_for_cpu(graph_path: Path, spec: ModelSpec, validate) -> dict:
    """Fold attention's key Transposes into FusedMatMul in the plain graph (embedder/cpu_graph.py), if it validates.

    Runs after the CUDA graph was fused from the plain one (the rewrite would hide attention from that
    fusion's pattern matching) and before int8 quantizes it.
    """
    from embedder.build.cpu_graph import fold_key_transposes

    rewritten = graph_path.with_name("model.cpu-rewrite.onnx")
    try:
        folded = fold_key_transposes(graph_path, rewritten)
        if not folded:
            rewritten.unlink()
            return {"applied": False, "reason": "no attention Transpose of this form in the graph"}
        validation = validate(rewritten)
    except Exception as e:  # the plain graph stays: correct, only slower
        rewritten.unlink(missing_ok=True)
        logger.warning("CPU graph rewrite skipped for %s: %s", spec.name, e)
        return {"applied": False, "reason": f"{type(e).__name__}: {e}"}
    os.replace(rewritten, graph_path)
    return {"applied": True, "folded_transposes": folded, "validation": validation}


def _batches_of(texts: list[str], backend, spec: ModelSpec, pad_id: int, input_names: list[str], size: int = 32):
    """Feeds for texts in batches of similar length, as the job would build them."""
    texts = sorted(texts, key=len)
    return [{n: a for n, a in _encode(backend, texts[i : i + size], spec.max_seq_length, pad_id).items() if n in input_names}
            for i in range(0, len(texts), size)]


def _run_graph(graph_path: Path, feeds: list[dict], kind: str = "cpu"):
    """(vectors for the feeds, the provider that ran them): on `kind` of the device table where it loads here,
    else on the CPU."""
    import numpy as np

    from embedder.infer.devices import DEVICE_KINDS
    from embedder.infer.session import open_session

    session, _ = open_session(graph_path, DEVICE_KINDS[kind])
    if session is None:
        session, reason = open_session(graph_path, DEVICE_KINDS["cpu"])
        if session is None:
            raise ExportError(f"cannot run {graph_path.name} to validate it: {reason}")
    return np.concatenate([session.run([OUTPUT_NAME], f)[0] for f in feeds]), session.get_providers()[0]


def _fix_output_dim(graph_path: Path, dim: int) -> None:
    """The TorchScript exporter leaves the vector axis symbolic; declare the real width."""
    import onnx

    model = onnx.load(str(graph_path))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = dim
    onnx.save(model, str(graph_path))


def _check_interface(info, input_names: list[str], dim: int) -> None:
    got_inputs = [(t.name, t.dtype, t.shape) for t in info.inputs]
    want_inputs = [(n, "int64", ("batch", "sequence")) for n in input_names]
    want_outputs = [(OUTPUT_NAME, "float32", ("batch", dim))]
    got_outputs = [(t.name, t.dtype, t.shape) for t in info.outputs]
    if got_inputs != want_inputs or got_outputs != want_outputs:
        raise ExportError(
            f"exported graph interface differs from the declared one: inputs {got_inputs} outputs {got_outputs}; "
            f"expected inputs {want_inputs} outputs {want_outputs}"
        )


def _validate(torch, wrapper, graph_path: Path, backend, input_names, spec: ModelSpec, pad_id: int, np) -> dict:
    """Run the graph and the PyTorch wrapper on an unseen batch shape; raise with the figures."""
    texts = list(_CHECK_TEXTS)
    if spec.max_seq_length > 64:
        texts.append(" ".join(_CHECK_TEXTS * 40))  # longer than max_seq_length: exercises truncation
    batch = _encode(backend, texts, spec.max_seq_length, pad_id)
    feeds = {n: batch[n] for n in input_names}
    got, _ = _run_graph(graph_path, [feeds])  # on the CPU, with the job's own session settings
    with torch.no_grad():
        want = wrapper(*(torch.from_numpy(feeds[n]) for n in input_names)).numpy()
    max_abs = float(np.abs(got - want).max())
    cosine = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1) + 1e-30)
    min_cos = float(cosine.min())
    figures = {
        "batch_size": len(texts),
        "lengths": [int(x) for x in batch["attention_mask"].sum(axis=1)],
        "max_abs_diff": max_abs,
        "min_cosine": min_cos,
        "thresholds": {"max_abs_diff": MAX_ABS_DIFF, "min_cosine": MIN_COSINE},
    }
    if not (max_abs <= MAX_ABS_DIFF and min_cos >= MIN_COSINE):
        raise ExportError(
            f"exported graph of {spec.name} disagrees with PyTorch: max abs diff {max_abs:.3g} "
            f"(limit {MAX_ABS_DIFF}), min cosine {min_cos:.7f} (limit {MIN_COSINE})"
        )
    return figures
