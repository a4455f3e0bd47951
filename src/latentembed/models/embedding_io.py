"""Reading and writing :class:`~latentembed.models.embedding.EmbeddingModel` directories.

This module sits below :mod:`~latentembed.models.embedding` and never imports it: the class's
``from_pretrained`` passes itself (``model_class``) to :func:`load_embedding_model`, which builds
that class (a subclass loads as itself), and ``save_pretrained`` / ``save_adapters`` pass the model.

Formats read by :func:`load_embedding_model` (a local directory, found by what it holds):

* latentembed's own (``latentembed.json`` + ``config.json`` + ``model.safetensors``): the whole
  state dict under the module's own names (``backbone.*``, ``pooling.latent_attention.*``, LoRA
  ``*.lora_a`` / ``*.lora_b``); the adapters' ranks and scalings (the LoRA layers' extra state)
  sit in ``latentembed.json``. :func:`save_embedding_model` writes it; a round trip is exact.
* NV-Embed-v2 style (``config.json`` with a ``latent_attention_config`` or tensors named
  ``latent_attention_model.*``): the backbone from ``embedding_model.*``, latent-attention
  pooling from ``latent_attention_model.*`` (shapes read from the tensors), NV-Embed's prompt
  template and, to reproduce the checkpoint's training, its instruction mask
  (``mask_instruction="nvembed_compat"``).
* a classic sentence-transformers directory of a supported decoder (``modules.json``; pooling,
  prompts, instruction exclusion, attention and max length from its files:
  :mod:`~latentembed.models.st_import`); latentembed's export writes one
  (``save_pretrained(dir, format="sentence-transformers")``).
* a plain HF decoder (Mistral / Llama / Qwen2, with or without ``model.`` prefix): the pooling
  must be chosen (``pooling=``); a latent-attention head is then freshly initialised.
* a GGUF file (``model.gguf``, llama / mistral / qwen2; :mod:`latentembed.models.gguf`): read as
  a plain decoder (``pooling=`` required), dequantised, its tokenizer rebuilt from the metadata.

PEFT LoRA directories are added with ``adapters={"name": "path/to/adapter", ...}``.
A ``tokenizer.json`` in the directory (or ``tokenizer=``) becomes ``model.tokenizer``; one with
more ids than the embedding table has rows is refused.

Saves (:func:`save_embedding_model`, :func:`save_adapters`) replace their directory whole and
all-or-nothing (:func:`latentembed.atomic_io.atomic_directory`): a killed save leaves the old
model or the new one, and no file of an earlier save (an old ``tokenizer.json``, the adapters of
an earlier run) survives. A directory that holds other files is refused, not emptied.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Optional, TypeVar, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..atomic_io import atomic_directory, missing_directory_message, read_json
from ..modules.latent_attention_unfolded import NVEMBED_PREFIX
from ..modules.lora import multi_lora_layers
from ..modules.peft_interop import load_peft_adapter, save_peft_adapter
from ..modules.pooling import POOLING_MODES
from ..tokenization import TextTokenizer, as_tokenizer, check_tokenizer_fits
from .checkpoint import CHECKPOINT_ENTRIES, CheckpointError, checkpoint_files, load_state_dict, misfit
from .decoder_config import DecoderConfig
from .embedding_config import EmbeddingConfig
from .gguf import gguf_config, gguf_tensors, is_gguf_file, load_gguf_state, open_gguf
from .gguf_tokenizer import gguf_tokenizer
from .st_export import ST_FORMAT, save_sentence_transformers
from .st_import import is_st_directory, st_embedding_settings

__all__ = ["load_embedding_model", "save_embedding_model", "save_adapters", "ArgumentError", "EMBEDDING_CONFIG_NAME"]

EMBEDDING_CONFIG_NAME = "latentembed.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
_EXTRA = "._extra_state"
_OVERRIDABLE = ("normalize", "prompt_template", "mask_instruction", "add_eos", "max_length", "causal")

#: The class a loader builds: EmbeddingModel or a subclass (its constructor's signature).
Model = TypeVar("Model", bound=nn.Module)


class ArgumentError(ValueError):
    """An argument of :func:`load_embedding_model` that does not fit the directory.

    ``argument`` is the parameter's name and ``value`` what came, so that a command line can
    name the flag its user typed: ``str(e)`` says ``pooling='last'``,
    ``e.message_for("--pooling")`` says ``--pooling last``.
    """

    def __init__(self, argument: str, value, template: str) -> None:
        self.argument, self.value, self.template = argument, value, template  # template: "{arg}" = the argument
        super().__init__(self.message_for())

    def message_for(self, flag: Optional[str] = None) -> str:
        """The message naming the argument as ``flag`` (default: as ``argument=``)."""
        if flag is None:
            named = f"{self.argument}=" + ("" if self.value is None else repr(self.value))
        else:
            named = flag + ("" if self.value is None else f" {self.value}")
        return self.template.format(arg=named)


def load_embedding_model(
    model_class: type[Model],
    path: Union[str, Path],
    *,
    pooling: Optional[str] = None,
    latent_attention: Optional[dict] = None,
    adapters: Optional[Mapping[str, Union[str, Path]]] = None,
    tokenizer=None,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device] = "cpu",
    attn_backend: str = "auto",
    **overrides,
) -> Model:
    """Build a ``model_class`` (:class:`EmbeddingModel`) from a local directory (formats: module
    docstring). Called as ``EmbeddingModel.from_pretrained(path, ...)``.

    Args:
        model_class: the class to build, ``EmbeddingModel`` or a subclass (``from_pretrained``
            passes the class it is called on).
        path: the directory.
        pooling: the pooling of a plain decoder checkpoint (required there); for the other
            formats, if given, it must equal the stored one.
        latent_attention: ``LatentAttentionPooling`` arguments for a new latent head on a plain
            decoder (``num_latents``, ``num_heads``, ``dim_head``, ``ff_mult``).
        adapters: ``{adapter name: PEFT LoRA directory}`` to load; slots the model lacks are
            created (targets and r_max from the files), existing slots are overwritten.
        tokenizer: a directory or tokenizer object; default: the model directory's, if any.
        dtype / device: of the parameters (default dtype: as stored).
        **overrides: other :class:`EmbeddingConfig` fields (``normalize``, ``prompt_template``,
            ``mask_instruction``, ``add_eos``, ``max_length``, ``causal``).

    Example:
        >>> model = EmbeddingModel.from_pretrained("NV-Embed-v2", dtype=torch.bfloat16, device="cuda")  # doctest: +SKIP
        >>> model.encode(["how do plants make food?"], task="retrieval")  # doctest: +SKIP
    """
    path = Path(path)
    gguf = is_gguf_file(path)
    if not (gguf or path.is_dir()):
        raise FileNotFoundError(missing_directory_message(path, "model directory (or .gguf file)"))
    bad = sorted(set(overrides) - set(_OVERRIDABLE))
    if bad:
        raise TypeError(
            f"from_pretrained got unexpected arguments {bad}; config fields it can override: {list(_OVERRIDABLE)}"
        )
    reader = open_gguf(path) if gguf else None
    decoder_config = gguf_config(reader, path) if gguf else DecoderConfig.from_hf_config(path)
    # The tokenizer before the weights: a corrupt or too large one fails before any loading.
    if tokenizer is not None:
        source = f"tokenizer={str(tokenizer)!r}" if isinstance(tokenizer, (str, Path)) else "tokenizer="
        tokenizer = as_tokenizer(tokenizer)
    elif gguf:
        tokenizer, source = gguf_tokenizer(reader, path), f"the tokenizer metadata of {path}"
    elif (path / "tokenizer.json").is_file():
        tokenizer, source = TextTokenizer.from_pretrained(path), str(path / "tokenizer.json")
    if tokenizer is not None:
        check_tokenizer_fits(
            tokenizer,
            decoder_config.vocab_size,
            source=source,
            table=f"the embedding table of {path} (vocab_size in its config.json)",
        )
    own = path / EMBEDDING_CONFIG_NAME
    fmt = (
        "gguf"
        if gguf
        else "own"
        if own.is_file()
        else "nvembed"
        if _is_nvembed(path)
        else "sentence-transformers"
        if is_st_directory(path)
        else "plain"
    )
    if latent_attention is not None and fmt != "plain":
        raise ValueError(f"latent_attention= describes a new head for a plain decoder; {path} stores its own pooling")
    target = _Target(
        model_class=model_class,
        decoder_config=decoder_config,
        dtype=dtype,
        device=device,
        attn_backend=attn_backend,
        overrides=overrides,
    )
    if fmt == "own":
        model = _load_own(path, own, pooling=pooling, target=target)
    elif fmt == "nvembed":
        model = _load_nvembed(path, pooling=pooling, target=target)
    elif fmt == "sentence-transformers":
        model = _load_sentence_transformers(path, pooling=pooling, target=target)
    elif fmt == "gguf":

        def load_backbone(backbone: nn.Module) -> None:
            tensors = gguf_tensors(reader, decoder_config, path, dtype)
            load_gguf_state(backbone, tensors, path, device)

        model = _load_plain(
            path, pooling=pooling, latent_attention=latent_attention, target=target, load_backbone=load_backbone
        )
    else:
        model = _load_plain(path, pooling=pooling, latent_attention=latent_attention, target=target)
    if adapters:
        _load_peft_adapters(model, adapters)
    model.tokenizer = tokenizer
    return model


def _is_nvembed(path: Path) -> bool:
    hf = read_json(path / "config.json")
    return "latent_attention_config" in hf or any(k.startswith(NVEMBED_PREFIX) for k in checkpoint_files(path))


def _check_pooling(pooling: Optional[str], stored: str, path: Path) -> None:
    if pooling is not None and pooling != stored:
        raise ArgumentError(
            "pooling",
            pooling,
            f"{path} holds a {stored!r}-pooling model; {{arg}} does not match (the weights depend on it)",
        )


class _Target(NamedTuple):
    """What every format's loader builds: a ``model_class`` of this backbone, with parameters of
    ``dtype`` (``None``: as stored) on ``device``, and the caller's EmbeddingConfig overrides."""

    model_class: type
    decoder_config: DecoderConfig
    dtype: Optional[torch.dtype]
    device: Union[str, torch.device]
    attn_backend: str
    overrides: dict

    def build(self, config: EmbeddingConfig) -> nn.Module:
        """The model of ``config``, on the meta device: no allocation, no random init (every
        tensor comes from disk)."""
        with torch.device("meta"):
            return self.model_class(self.decoder_config, config, attn_backend=self.attn_backend)


def _load_own(path: Path, config_file: Path, *, pooling: Optional[str], target: _Target) -> nn.Module:
    dtype, device, overrides = target.dtype, target.device, target.overrides
    saved = read_json(config_file)
    if saved.get("format") != "latentembed" or saved.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_file}: expected format 'latentembed' version {FORMAT_VERSION}, "
            f"got {saved.get('format')!r} version {saved.get('version')!r}"
        )
    if not isinstance(saved.get("embedding"), dict):
        got = (
            "lacks the key 'embedding'"
            if "embedding" not in saved
            else f"has 'embedding' = {type(saved['embedding']).__name__}"
        )
        raise ValueError(f"{config_file} {got}; expected an object of EmbeddingConfig fields (pooling, ...)")
    if not isinstance(saved.get("extra_state", {}), dict):
        raise ValueError(
            f"{config_file}: 'extra_state' must be an object (the LoRA layers' ranks and scalings), "
            f"got {type(saved['extra_state']).__name__}"
        )
    try:
        config = EmbeddingConfig.from_dict({**saved["embedding"], **overrides})
    except (TypeError, ValueError) as e:
        given = f" with overrides {sorted(overrides)}" if overrides else ""
        raise ValueError(f"{config_file}: 'embedding'{given}: {e}") from None
    _check_pooling(pooling, config.pooling, path)
    model = target.build(config)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found")
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith(_EXTRA)}
    with safe_open(weights, framework="pt", device="cpu") as f:
        problems = misfit(
            {k: tuple(v.shape) for k, v in expected.items()}, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        )
        if problems:
            raise CheckpointError(f"{weights} does not fit its {EMBEDDING_CONFIG_NAME}:\n" + "\n".join(problems))
        state = {
            k: f.get_tensor(k).to(device=device, dtype=dtype if expected[k].is_floating_point() else None)
            for k in expected
        }
    state.update(saved.get("extra_state", {}))
    model.load_state_dict(state, strict=True, assign=True)
    model.backbone.reset_buffers(torch.device(device))
    return model


def _load_nvembed(path: Path, *, pooling: Optional[str], target: _Target) -> nn.Module:
    dtype, device, decoder_config = target.dtype, target.device, target.decoder_config
    _check_pooling(pooling, "latent_attention", path)
    files = checkpoint_files(path)
    hf = read_json(path / "config.json")
    head = {k[len(NVEMBED_PREFIX) :]: k for k in files if k.startswith(NVEMBED_PREFIX)}
    if not head:
        raise CheckpointError(f"{path}: config.json has latent_attention_config but no {NVEMBED_PREFIX}* tensors")
    shapes = {}
    for file in sorted({files[k] for k in head.values()}):
        with safe_open(file, framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k in set(head.values())})
    # Shapes from the tensors themselves (the config's fields have been renamed across versions).
    try:
        num_latents, latent_dim = shapes[NVEMBED_PREFIX + "latents"]
        inner = shapes[NVEMBED_PREFIX + "cross_attend_blocks.0.fn.to_q.weight"][0]
        ff_width = shapes[NVEMBED_PREFIX + "cross_attend_blocks.1.fn.net.0.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"{path}: latent-attention head lacks {e.args[0]}") from None
    lat_cfg = hf.get("latent_attention_config") or {}
    heads = int(lat_cfg.get("num_cross_heads", 8))
    if inner % heads:
        raise CheckpointError(f"{path}: to_q width {inner} is not a multiple of num_cross_heads {heads}")
    latent = {
        "num_latents": num_latents,
        "num_heads": heads,
        "dim_head": inner // heads,
        "ff_mult": ff_width // (2 * decoder_config.hidden_size),
        "latent_dim": latent_dim,
    }
    config = EmbeddingConfig(
        **{
            "pooling": "latent_attention",
            "latent_attention": latent,
            "normalize": bool(lat_cfg.get("output_normalize", True)),
            "prompt_template": "nvembed",
            "mask_instruction": "nvembed_compat" if hf.get("is_mask_instruction", True) else "none",
            "add_eos": bool(hf.get("add_eos", True)),
            **target.overrides,
        }
    )
    model = target.build(config)
    model.backbone.checkpoint_format = load_state_dict(
        model.backbone, path, dtype=dtype, device=device, prefix="embedding_model."
    )
    block = model.pooling.latent_attention
    expected = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    problems = misfit(expected, {name: shapes[key] for name, key in head.items()}, head.get)
    if problems:
        raise CheckpointError(f"{path}: latent-attention head does not fit:\n" + "\n".join(problems))
    state = {}
    for name, key in head.items():
        with safe_open(files[key], framework="pt", device="cpu") as f:
            state[name] = f.get_tensor(key).to(device=device, dtype=dtype)
    block.load_state_dict(state, strict=True, assign=True)
    return model


def _load_sentence_transformers(path: Path, *, pooling: Optional[str], target: _Target) -> nn.Module:
    settings = st_embedding_settings(path)
    try:
        config = EmbeddingConfig(**{**settings.config, **target.overrides})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} (sentence-transformers directory): {e}") from None
    _check_pooling(pooling, config.pooling, path)
    model = target.build(config)
    model.backbone.checkpoint_format = load_state_dict(model.backbone, path, dtype=target.dtype, device=target.device)
    if settings.latent_dir is not None:
        weights = settings.latent_dir / WEIGHTS_NAME
        block = model.pooling.latent_attention
        expected = {k: tuple(v.shape) for k, v in block.state_dict().items() if not k.endswith(_EXTRA)}
        with safe_open(weights, framework="pt", device="cpu") as f:
            problems = misfit(expected, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            if problems:
                raise CheckpointError(f"{weights} does not fit its config.json:\n" + "\n".join(problems))
            state = {k: f.get_tensor(k).to(device=target.device, dtype=target.dtype) for k in expected}
        block.load_state_dict(state, strict=True, assign=True)
    return model


def _load_plain(
    path: Path,
    *,
    pooling: Optional[str],
    latent_attention: Optional[dict],
    target: _Target,
    load_backbone: Optional[Callable[[nn.Module], None]] = None,
) -> nn.Module:
    dtype, device = target.dtype, target.device
    if pooling is None:
        raise ArgumentError(
            "pooling",
            None,
            f"{path} is a plain decoder checkpoint: choose its pooling with {{arg}} "
            f"(one of {', '.join(POOLING_MODES)})",
        )
    if pooling not in POOLING_MODES:
        raise ArgumentError(
            "pooling", pooling, f"{{arg}} is not a pooling mode; expected one of {', '.join(POOLING_MODES)}"
        )
    config = EmbeddingConfig(pooling=pooling, latent_attention=latent_attention, **target.overrides)
    model = target.build(config)
    if load_backbone is None:
        model.backbone.checkpoint_format = load_state_dict(model.backbone, path, dtype=dtype, device=device)
    else:
        load_backbone(model.backbone)
    if config.pooling == "latent_attention":
        # a new head, randomly initialised for training, where the backbone's tensors are
        with torch.device(device):
            model.pooling = model.make_pooling()
        model.pooling.to(dtype or next(model.backbone.parameters()).dtype)
    return model


def _peft_modules(directory: Path) -> tuple[list, int]:
    """The module names an adapter directory touches, and its largest rank."""
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} is not a PEFT adapter directory: adapter_model.safetensors not found")
    modules, rank = set(), 0
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            if key.endswith(".lora_A.weight"):
                modules.add(key[len("base_model.model.") : -len(".lora_A.weight")])
                rank = max(rank, f.get_slice(key).get_shape()[0])
    return sorted(modules), rank


def _load_peft_adapters(model: nn.Module, adapters: Mapping[str, Union[str, Path]]) -> None:
    found = {name: _peft_modules(Path(p)) for name, p in adapters.items()}
    # PEFT trained on a *ForCausalLM (or NV-Embed) names the backbone "model." (or
    # "embedding_model."): a container with that child name lets the names line up unchanged.
    prefixes = {m.split(".layers.")[0] + "." if ".layers." in m else "" for mods, _ in found.values() for m in mods}
    if len(prefixes) != 1:
        raise ValueError(f"adapters {list(adapters)} name the backbone differently: {sorted(prefixes)}")
    prefix = prefixes.pop()
    container = nn.ModuleDict({prefix[:-1]: model.backbone}) if prefix else model.backbone
    if model.config.lora is None:
        targets = sorted({m[len(prefix) :] for mods, _ in found.values() for m in mods})
        r_max = max(r for _, r in found.values())
        model.add_adapters(list(adapters), rank=r_max, alpha=r_max, target_modules=targets, r_max=r_max)
    missing = [n for n in adapters if n not in model.adapter_names]
    if missing:
        raise ValueError(f"adapters {missing} are not slots of the model (its adapters: {list(model.adapter_names)})")
    for name, p in adapters.items():
        load_peft_adapter(container, p, name)


def save_embedding_model(
    model: nn.Module,
    path: Union[str, Path],
    *,
    save_tokenizer: bool = True,
    format: str = "latentembed",
    adapter: Optional[str] = None,
) -> Path:
    """Write ``model`` as directory ``path`` in latentembed's own format (exact round trip through
    :func:`load_embedding_model`): ``config.json``, ``latentembed.json``, ``model.safetensors``
    and the tokenizer files when the model has a tokenizer (and ``save_tokenizer``).

    ``format="sentence-transformers"`` writes a classic sentence-transformers directory instead
    (:func:`latentembed.models.st_export.save_sentence_transformers`; ``adapter`` picks the
    adapter a multi-adapter model merges), which sentence-transformers, TEI, vLLM and MTEB read
    and :func:`load_embedding_model` reads back.

    All-or-nothing: the directory is built beside ``path`` and swapped in whole, so a killed
    save leaves the old model or the new one and no file of the old one survives; a directory
    holding entries other than checkpoint files raises FileExistsError and is left as it is.
    Returns the directory.

    A model whose adapter is merged (:meth:`EmbeddingModel.merge_adapters`) is written as a
    plain model: the merged weights, no adapters.

    Example:
        >>> save_embedding_model(model, "out/model")  # doctest: +SKIP
    """
    if format == ST_FORMAT:
        return save_sentence_transformers(model, path, adapter=adapter)
    if format != "latentembed":
        raise ValueError(f"format must be 'latentembed' or {ST_FORMAT!r}, got {format!r}")
    if adapter is not None:
        raise ValueError(f"adapter={adapter!r} applies to format={ST_FORMAT!r} only (latentembed keeps every adapter)")
    state, config = model.state_dict(), model.config
    layers = dict(multi_lora_layers(model))
    merged = [name for name, layer in layers.items() if layer.merged_adapter is not None]
    if merged:
        # A merged model (merge_adapters) is saved as what it computes: a plain model whose
        # weights hold the adapter, without the adapter tensors (they would be added again).
        if len(merged) != len(layers) or len(config.lora.adapters) != 1:
            raise RuntimeError(
                f"{merged[0]}: an adapter is merged into the weight, but not as merge_adapters() does it "
                f"({len(merged)} of {len(layers)} layers, adapters {config.lora.adapters}); unmerge() before saving"
            )
        dropped = {f"{name}.{part}" for name in layers for part in ("lora_a", "lora_b", _EXTRA[1:])}
        state = {k: v for k, v in state.items() if k not in dropped}
        config = dataclasses.replace(config, lora=None)
    extra = {k: v for k, v in state.items() if k.endswith(_EXTRA)}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if not k.endswith(_EXTRA)}
    meta = {
        "format": "latentembed",
        "version": FORMAT_VERSION,
        "embedding": config.to_dict(),
        "extra_state": extra,
    }
    with atomic_directory(path, owned=CHECKPOINT_ENTRIES) as tmp:
        # Plain writes inside: the temporary directory is swapped in only once it is complete.
        (tmp / "config.json").write_text(json.dumps(model.backbone.config.to_hf_dict(), indent=2) + "\n")
        (tmp / EMBEDDING_CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if save_tokenizer and model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
    return Path(path)


def _is_adapter_dir(entry: Path) -> bool:
    return entry.is_dir() and not entry.is_symlink() and (entry / "adapter_config.json").is_file()


def save_adapters(model: nn.Module, path: Union[str, Path]) -> list:
    """Every adapter of ``model`` as a PEFT directory ``path/<adapter>`` (module names relative
    to the backbone, as PEFT writes for a HF ``*Model``). Returns the directories.

    ``path`` is replaced whole and all-or-nothing: adapters of an earlier save that the model
    no longer has do not survive; a ``path`` holding anything but adapter directories raises
    FileExistsError and is left as it is.
    """
    if not model.adapter_names:
        raise ValueError("the model has no adapters")
    with atomic_directory(path, owned=_is_adapter_dir) as tmp:
        for name in model.adapter_names:
            save_peft_adapter(model.backbone, name, tmp / name)
    return [Path(path) / name for name in model.adapter_names]
