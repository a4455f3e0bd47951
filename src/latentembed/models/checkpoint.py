"""Safetensors checkpoints of the decoder: load (memory-mapped, strict) and save.

Layouts: one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``. Key
prefixes: none (``MistralModel.save_pretrained``), ``model.`` (``*ForCausalLM``) or
``embedding_model.`` (NV-Embed-v2); the prefix is detected from the embedding key and kept for
saving back. Tensors are read one at a time from memory-mapped files and converted straight to
the requested dtype and device, so no full-precision copy of the model exists on the way.

Keys that are not part of the backbone are skipped, not errors: ``lm_head.weight`` (an
embedding backbone has no LM head; hidden states do not depend on it), ``*.rotary_emb.inv_freq``
(recomputed from the config) and, under a prefix, keys of sibling modules such as NV-Embed's
``latent_attention_model.*`` (they belong to the pooling head; :func:`load_decoder` returns
their names so that a head can load them).

Saving writes the backbone only. Skipped tensors are not carried along: saving a directory
loaded from a ``*ForCausalLM`` checkpoint gives a ``model.``-prefixed backbone without
``lm_head.weight`` (not loadable as a causal LM with an untied head), and an NV-Embed directory
loses its pooling head. ``model.checkpoint_format.skipped_keys`` lists what was left out; copy
those tensors from the source files if the saved directory must be complete.

A save replaces the directory whole and all-or-nothing (:func:`latentembed.atomic_io.atomic_directory`):
a killed save leaves the old checkpoint or the new one, never a mix, and nothing of an earlier
save survives (an old shard index, old shards, an old ``tokenizer.json``). A directory holding
anything but checkpoint files (:data:`CHECKPOINT_ENTRIES`) is refused rather than emptied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic_io import atomic_directory, missing_directory_message, read_json
from ..tokenization import TOKENIZER_FILES
from .decoder import DecoderModel
from .decoder_config import DecoderConfig
from .gguf import is_gguf_file, load_gguf_decoder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
KNOWN_PREFIXES = ("", "model.", "embedding_model.")
_EMBED_KEY = "embed_tokens.weight"
#: What a checkpoint directory holds (HF and latentembed files): a save replaces such entries and
#: refuses a directory with others (a README, code, a user's files) instead of deleting them.
CHECKPOINT_ENTRIES = (
    "config.json",
    "generation_config.json",
    "latentembed.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    *TOKENIZER_FILES,
)


class CheckpointError(ValueError):
    """A checkpoint does not fit the model; the message lists every problem."""


@dataclass
class CheckpointFormat:
    """How a checkpoint was stored, so that saving reproduces it."""

    prefix: str = ""
    sharded: bool = False
    max_shard_bytes: Optional[int] = None
    skipped_keys: list = field(default_factory=list)  # original names of keys not loaded


def checkpoint_files(path: Union[str, Path]) -> dict[str, Path]:
    """Map every tensor name of the checkpoint in directory ``path`` to its file."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(missing_directory_message(path, "checkpoint directory"))
    index = path / INDEX_FILE
    single = path / SINGLE_FILE
    if index.is_file() and single.is_file():
        # Left by saves of an older latentembed (or a hand-made mix): one of them is stale, and
        # picking either silently could load the wrong weights.
        raise CheckpointError(
            f"{path} holds both {SINGLE_FILE} and {INDEX_FILE}; which one is current "
            "cannot be told: remove the stale one"
        )
    if index.is_file():
        try:
            weight_map = read_json(index)["weight_map"]
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        except KeyError:
            raise CheckpointError(f"{index} lacks the key 'weight_map' (tensor name -> shard file)") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} lists shard files that do not exist in {path}: {', '.join(missing)}")
        return {k: path / f for k, f in weight_map.items()}
    if not single.is_file():
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


def detect_prefix(keys) -> str:
    """The prefix in front of the backbone's names (``""``, ``"model."``, ``"embedding_model."``)."""
    found = sorted(k[: -len(_EMBED_KEY)] for k in keys if k.endswith(_EMBED_KEY))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise CheckpointError(f"several embedding tables ({[p + _EMBED_KEY for p in found]}); pass prefix=")
    for prefix in ("embedding_model.", "model."):
        if any(k.startswith(prefix + "layers.") for k in keys):
            return prefix
    return ""


def _skipped(name: str, prefix: str) -> bool:
    if name.startswith("lm_head.") or name.endswith("rotary_emb.inv_freq"):
        return True
    return bool(prefix) and not name.startswith(prefix)


def misfit(expected: dict, found: dict, stored_name=None) -> list[str]:
    """One line per kind of problem (``"  2 missing: a; b"``, ``unexpected``, ``wrong shape``) of
    checkpoint tensors ``found`` against a model's ``expected`` (both name -> shape, under the
    model's names); ``stored_name`` maps a model name to the name in the checkpoint's files."""
    stored = stored_name or (lambda k: k)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(stored(k) for k in set(found) - set(expected))
    misshaped = sorted(
        f"{stored(k)}: checkpoint {found[k]}, model {expected[k]}"
        for k in set(found) & set(expected)
        if found[k] != expected[k]
    )
    return [
        f"  {len(items)} {label}: " + "; ".join(items)
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
        if items
    ]


def load_state_dict(
    model: DecoderModel,
    path: Union[str, Path],
    *,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
    strict: bool = True,
    prefix: Optional[str] = None,
) -> CheckpointFormat:
    """Load the checkpoint directory ``path`` into ``model`` (which may live on the meta device).

    Every parameter is replaced by the tensor read from disk, converted to ``dtype`` (default:
    the stored dtype) on ``device`` (default: the model's device, CPU for a meta model).
    With ``strict`` (default), missing, unexpected or mis-shaped tensors raise one
    :class:`CheckpointError` listing them all, before any data is read. ``strict=False`` skips
    unexpected and mis-shaped tensors and keeps the model's own values for missing ones (an
    error still if those are on the meta device).
    """
    files = checkpoint_files(path)
    prefix = detect_prefix(files) if prefix is None else prefix
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    skipped = [k for k in files if _skipped(k, prefix)]
    found = {k[len(prefix) :]: k for k in files if not _skipped(k, prefix)}
    wanted = set(found.values())
    shapes = {}
    for file in sorted(set(files.values())):
        with safe_open(file, framework="pt") as f:  # reads the header only
            for key in f.keys():
                if key in wanted:
                    shapes[key] = tuple(f.get_slice(key).get_shape())
    problems = misfit(expected, {k: shapes[key] for k, key in found.items()}, found.get)
    if strict and problems:
        raise CheckpointError(
            "\n".join(
                [f"checkpoint {path} (prefix {prefix!r}) does not fit the {model.config.model_type} model:", *problems]
            )
        )
    if device is None:
        param = next(model.parameters())
        device = torch.device("cpu") if param.device.type == "meta" else param.device
    state = {}
    by_file: dict[Path, list] = {}
    for name, key in found.items():
        if name in expected and shapes[key] == expected[name]:
            by_file.setdefault(files[key], []).append((name, key))
    for file, pairs in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for name, key in pairs:
                # get_tensor views the memory-mapped file; .to() makes the one needed copy.
                state[name] = f.get_tensor(key).to(device=device, dtype=dtype or None)
    model.load_state_dict(state, strict=False, assign=True)
    model.reset_buffers(torch.device(device))
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise CheckpointError(
            f"checkpoint {path} lacks {len(left)} tensors of a model built on meta: " + "; ".join(left)
        )
    sharded = (Path(path) / INDEX_FILE).is_file()
    # Keep the largest shard's size so that saving splits the same way.
    shard_bytes = max(f.stat().st_size for f in set(files.values())) if sharded else None
    return CheckpointFormat(prefix=prefix, sharded=sharded, max_shard_bytes=shard_bytes, skipped_keys=skipped)


def load_decoder(
    path: Union[str, Path],
    *,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device] = "cpu",
    strict: bool = True,
    causal: bool = False,
    attn_backend: str = "auto",
    prefix: Optional[str] = None,
) -> DecoderModel:
    """Build a :class:`DecoderModel` from a local HF-style directory (config.json + safetensors)
    or a GGUF file (``model.gguf``: :mod:`latentembed.models.gguf`; dequantised to ``dtype``,
    float32 by default; ``strict`` and ``prefix`` do not apply).

    The model is created on the meta device (no allocation, no random init) and its parameters
    are the tensors read from disk in ``dtype`` on ``device``. The checkpoint's layout is kept in
    ``model.checkpoint_format`` for :func:`save_decoder`.

    Example:
        >>> model = load_decoder("path/to/NV-Embed-v2", dtype=torch.bfloat16, device="cuda")  # doctest: +SKIP
        >>> small = load_decoder("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    """
    if is_gguf_file(path):
        return load_gguf_decoder(path, dtype=dtype, device=device, causal=causal, attn_backend=attn_backend)
    if not Path(path).is_dir():
        raise FileNotFoundError(missing_directory_message(path, "checkpoint directory"))
    config = DecoderConfig.from_hf_config(path)
    with torch.device("meta"):
        model = DecoderModel(config, causal=causal, attn_backend=attn_backend)
    model.checkpoint_format = load_state_dict(model, path, dtype=dtype, device=device, strict=strict, prefix=prefix)
    return model


def save_decoder(
    model: DecoderModel,
    path: Union[str, Path],
    *,
    prefix: Optional[str] = None,
    max_shard_bytes: Optional[int] = None,
) -> Path:
    """Write ``config.json`` and the weights as safetensors as directory ``path``, all-or-nothing.

    ``prefix`` and ``max_shard_bytes`` default to the format the model was loaded from (no
    prefix, one file for a model built in code). With ``max_shard_bytes`` the weights are split
    into ``model-0000i-of-0000n.safetensors`` files plus ``model.safetensors.index.json``.
    Only the backbone's tensors are written: keys skipped at load (``lm_head.weight``, a pooling
    head's tensors; see ``model.checkpoint_format.skipped_keys``) are not in the output.
    The directory is replaced whole (module docstring); one holding entries other than
    :data:`CHECKPOINT_ENTRIES` raises FileExistsError and is left as it is. Returns ``path``.

    Example:
        >>> save_decoder(model, "out/decoder", max_shard_bytes=5 * 2**30)  # doctest: +SKIP
    """
    fmt = getattr(model, "checkpoint_format", None) or CheckpointFormat()
    prefix = fmt.prefix if prefix is None else prefix
    if max_shard_bytes is None and fmt.sharded:
        max_shard_bytes = fmt.max_shard_bytes
    state = {prefix + k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_directory(path, owned=CHECKPOINT_ENTRIES) as tmp:
        _write_files(model.config.to_hf_dict(), state, tmp, max_shard_bytes)
    return Path(path)


def _write_files(hf_config: dict, state: dict, directory: Path, max_shard_bytes: Optional[int]) -> None:
    # Plain writes: ``directory`` is atomic_directory's temporary directory.
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(state, str(directory / SINGLE_FILE), metadata=meta)
        return
    shards: list[dict] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
