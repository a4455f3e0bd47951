"""Reading a decoder from a GGUF file (llama.cpp's single-file format): config, weights, tokenizer.

GGUF is how small models travel offline: one file holds the architecture's metadata, the tokenizer
and the (often quantised) weights. :func:`read_gguf` turns a file of the ``llama``, ``mistral`` or
``qwen2`` architecture into what a Hugging Face directory would hold:

* metadata -> :class:`DecoderConfig` (sizes, grouped-query heads, RMSNorm epsilon, rope theta;
  biases and tied embeddings from which tensors exist; Mistral is llama.cpp's ``llama``
  architecture with "mistral" in ``general.name``, as transformers reads it);
* tensors dequantised with the ``gguf`` package (types in :data:`SUPPORTED_TENSOR_TYPES`; others
  are refused by name before anything is dequantised), renamed to the decoder's names, with
  llama.cpp's Q/K row permutation undone (its converter interleaves the two rotary halves of each
  head for the ``llama`` architecture; Qwen2 files are stored unpermuted);
* the tokenizer, rebuilt from the metadata as a ``tokenizer.json``
  (:mod:`latentembed.models.gguf_tokenizer`).

``load_decoder("model.gguf")`` and ``EmbeddingModel.from_pretrained("model.gguf", pooling=...)``
read the file directly (no converted copy on disk: a Q4_1 file dequantised to float32 is ~5.5x
its size); ``save_pretrained`` then writes an ordinary directory. Needs ``pip install gguf``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from .decoder import DecoderModel
from .decoder_config import DecoderConfig
from .gguf_tokenizer import GGUFError, gguf_tokenizer

__all__ = [
    "GGUFError",
    "GGUFContents",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TENSOR_TYPES",
    "is_gguf_file",
    "open_gguf",
    "gguf_config",
    "read_gguf",
    "load_gguf_decoder",
    "unpermute_rotary_rows",
]

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
#: GGML tensor types this loader dequantises (all tested against transformers' loader).
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
_MAGIC = b"GGUF"
# GGUF tensor name (per block: blk.N.<part>) -> the decoder's parameter name.
_GLOBAL_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
#: The LM head is not part of an embedding backbone; hidden states do not depend on it.
_SKIPPED = ("output.weight",)


@dataclass
class GGUFContents:
    """What :func:`read_gguf` returns.

    ``config``: the backbone's :class:`DecoderConfig`; ``tensors``: parameter name -> tensor under
    the decoder's names (``embed_tokens.weight`` [vocab, D], ``layers.N.self_attn.q_proj.weight``
    [H*hd, D], ...); ``tokenizer``: a :class:`~latentembed.tokenization.TextTokenizer` rebuilt
    from the metadata (None when the file has no tokenizer); ``metadata``: every scalar field.
    """

    config: DecoderConfig
    tensors: dict
    tokenizer: Any
    metadata: dict


def is_gguf_file(path: Union[str, Path]) -> bool:
    """True for an existing file that starts with the GGUF magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == _MAGIC


def open_gguf(path: Union[str, Path]):
    """A ``gguf.GGUFReader`` over ``path`` (memory-mapped); a file that does not start with the
    GGUF magic bytes or cannot be parsed whole (truncated, corrupt) raises :class:`GGUFError`."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ImportError("reading a .gguf file needs the gguf package: pip install gguf") from None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {str(path)!r}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise GGUFError(f"{path} is not a GGUF file: it starts with {magic!r}, expected {_MAGIC!r}")
    try:
        # The reader maps every tensor while parsing: a file cut anywhere fails here.
        return GGUFReader(path)
    except Exception as e:  # ValueError, IndexError or numpy errors, depending on where the cut is
        raise GGUFError(
            f"{path} ({size} bytes) could not be parsed as GGUF, truncated or corrupt: {type(e).__name__}: {e}"
        ) from None


def _fields(reader) -> dict:
    """Every metadata field as a Python value (arrays as lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def _architecture(meta: dict, path: Path) -> tuple[str, str]:
    """(GGUF architecture, DecoderConfig model_type)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path}: general.architecture {arch!r} is not supported; expected one of {SUPPORTED_ARCHITECTURES}"
        )
    if arch == "llama" and "mistral" in str(meta.get("general.name", "")).lower():
        return arch, "mistral"  # llama.cpp stores Mistral models as llama
    return arch, arch


def _int_field(meta: dict, key: str, path: Path, default: Optional[int] = None) -> int:
    value = meta.get(key, default)
    if value is None:
        raise GGUFError(f"{path} lacks the metadata field {key!r}")
    if isinstance(value, list):  # some files store per-layer values; uniform ones are fine
        if len(set(value)) != 1:
            raise GGUFError(f"{path}: {key} differs between layers ({sorted(set(value))}); not supported")
        value = value[0]
    return int(value)


def gguf_config(reader, path: Union[str, Path] = "<gguf>") -> DecoderConfig:
    """The :class:`DecoderConfig` a GGUF file describes (metadata and tensor names only)."""
    path = Path(path)
    meta = _fields(reader)
    arch, model_type = _architecture(meta, path)
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise GGUFError(f"{path} has no token_embd.weight tensor")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in names:
        what = f"rope scaling {scaling!r}" if scaling not in ("none", None) else "a rope_freqs tensor (scaled rope)"
        raise GGUFError(f"{path} uses {what}; latentembed reads GGUF files with plain rope only")
    heads = _int_field(meta, f"{arch}.attention.head_count", path)
    hidden = _int_field(meta, f"{arch}.embedding_length", path)
    head_dim = _int_field(meta, f"{arch}.attention.key_length", path, hidden // heads if heads else None)
    rotary = meta.get(f"{arch}.rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:
        raise GGUFError(f"{path}: rope.dimension_count {rotary} != head_dim {head_dim} (partial rotary); not supported")
    vocab = int(names["token_embd.weight"].shape[-1])  # ggml order: [D, vocab]
    pad = meta.get("tokenizer.ggml.padding_token_id")
    try:
        return DecoderConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=_int_field(meta, f"{arch}.feed_forward_length", path),
            num_hidden_layers=_int_field(meta, f"{arch}.block_count", path),
            num_attention_heads=heads,
            num_key_value_heads=_int_field(meta, f"{arch}.attention.head_count_kv", path, heads),
            model_type=model_type,
            head_dim=head_dim,
            rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            max_position_embeddings=_int_field(meta, f"{arch}.context_length", path, 32768),
            qkv_bias="blk.0.attn_q.bias" in names,
            o_bias="blk.0.attn_output.bias" in names,
            mlp_bias="blk.0.ffn_up.bias" in names,
            tie_word_embeddings="output.weight" not in names,
            pad_token_id=None if pad is None else int(pad),
            extra={
                k: int(meta[f"tokenizer.ggml.{g}"])
                for k, g in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"))
                if f"tokenizer.ggml.{g}" in meta
            },
        )
    except (TypeError, ValueError) as e:
        raise GGUFError(f"{path}: metadata gives an invalid config: {e}") from None


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: ``weight`` [num_heads * hd, ...] (a weight or a bias).

    llama.cpp's converter reorders each head's rows from the two-halves rotary layout
    (``rotate_half``: rows ``[0, hd/2)`` pair with ``[hd/2, hd)``) to interleaved pairs
    (``(0, 1), (2, 3), ...``) by viewing the head as [2, hd/2] and transposing to [hd/2, 2];
    the inverse views it as [hd/2, 2] and transposes back.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _parameter_name(gguf_name: str) -> Optional[str]:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    return None


def _check_tensor_types(reader, path: Path) -> None:
    bad: dict[str, list] = {}
    for t in reader.tensors:
        if t.name not in _SKIPPED and t.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
            bad.setdefault(t.tensor_type.name, []).append(t.name)
    if bad:
        listed = "; ".join(f"{k} ({len(v)} tensors, e.g. {v[0]})" for k, v in sorted(bad.items()))
        raise GGUFError(
            f"{path} holds tensors of unsupported quantisation types: {listed}; supported: "
            f"{', '.join(SUPPORTED_TENSOR_TYPES)}"
        )


def _dequantize(tensor) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists the fastest axis first
    if tensor.tensor_type == GGMLQuantizationType.F32:
        # a copy: the reader's arrays view the read-only memory map
        return np.array(tensor.data, dtype=np.float32).reshape(shape)
    return dequantize(tensor.data, tensor.tensor_type).reshape(shape)


def gguf_tensors(
    reader, config: DecoderConfig, path: Union[str, Path] = "<gguf>", dtype: Optional[torch.dtype] = None
) -> dict:
    """The decoder's parameters, dequantised (float32 unless ``dtype``), Q/K unpermuted for llama."""
    path = Path(path)
    _check_tensor_types(reader, path)
    unknown = [t.name for t in reader.tensors if t.name not in _SKIPPED and _parameter_name(t.name) is None]
    if unknown:
        raise GGUFError(
            f"{path} holds {len(unknown)} tensors a {config.model_type} decoder does not have: "
            + ", ".join(unknown[:8])
            + (" ..." if len(unknown) > 8 else "")
        )
    permuted = config.model_type in ("llama", "mistral")  # llama.cpp's llama converter only
    out = {}
    for t in reader.tensors:
        if t.name in _SKIPPED:
            continue
        weights = _dequantize(t)
        if permuted and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = config.num_attention_heads if ".attn_q." in t.name else config.num_key_value_heads
            weights = unpermute_rotary_rows(weights, heads)
        tensor = torch.from_numpy(np.ascontiguousarray(weights))
        out[_parameter_name(t.name)] = tensor.to(dtype) if dtype is not None else tensor.float()
    return out


def read_gguf(path: Union[str, Path], *, dtype: Optional[torch.dtype] = None, tokenizer: bool = True) -> GGUFContents:
    """Config, dequantised tensors and tokenizer of the GGUF file ``path`` (module docstring).

    Example:
        >>> contents = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
        >>> contents.config.num_hidden_layers, contents.tensors["embed_tokens.weight"].shape  # doctest: +SKIP
        (30, torch.Size([49152, 576]))
    """
    path = Path(path)
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    tok = gguf_tokenizer(reader, path) if tokenizer else None
    tensors = gguf_tensors(reader, config, path, dtype)
    meta = {k: v for k, v in _fields(reader).items() if not isinstance(v, list)}
    return GGUFContents(config=config, tensors=tensors, tokenizer=tok, metadata=meta)


def load_gguf_state(model: DecoderModel, tensors: dict, path: Union[str, Path], device) -> None:
    """Put ``tensors`` (from :func:`gguf_tensors`) into ``model`` (which may be on meta) on
    ``device``; every parameter must be there with its shape (one error lists all misfits)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = sorted(set(expected) - set(found))
    shared = set(expected) & set(found)
    misshaped = sorted(f"{k}: file {found[k]}, model {expected[k]}" for k in shared if found[k] != expected[k])
    if missing or misshaped:
        problems = (("missing", missing), ("wrong shape", misshaped))
        lines = [f"  {len(v)} {label}: " + "; ".join(v) for label, v in problems if v]
        raise GGUFError(f"{path} does not fit its {model.config.model_type} config:\n" + "\n".join(lines))
    model.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=True, assign=True)
    model.reset_buffers(torch.device(device))


def load_gguf_decoder(
    path: Union[str, Path],
    *,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device] = "cpu",
    causal: bool = False,
    attn_backend: str = "auto",
) -> DecoderModel:
    """A :class:`DecoderModel` from a GGUF file (``load_decoder`` calls this for a ``.gguf`` path).

    Example:
        >>> model = load_gguf_decoder("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    """
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    tensors = gguf_tensors(reader, config, path, dtype)
    with torch.device("meta"):
        model = DecoderModel(config, causal=causal, attn_backend=attn_backend)
    load_gguf_state(model, tensors, path, device)
    return model
