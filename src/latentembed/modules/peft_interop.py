"""Read and write PEFT LoRA adapter directories as one of a model's stacked adapters.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r]; the
update of a module is ``scaling * B A`` with ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``), where ``rank_pattern`` / ``alpha_pattern`` override r and alpha per module
(keys are regular expressions matched against the end of the module name). Only plain LoRA on
nn.Linear is supported: DoRA, bias training, ``fan_in_fan_out`` (GPT-2 Conv1D), embedding
adapters, ``modules_to_save`` and the other variants raise a clear error instead of loading
something that would compute differently. PEFT itself is not needed to read or write.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..atomic_io import atomic_directory
from .lora import multi_lora_layers

__all__ = ["load_peft_adapter", "save_peft_adapter", "PEFT_ENTRIES"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: What a PEFT adapter directory holds (README.md: the model card PEFT writes): a save replaces
#: these and refuses a directory with other entries instead of deleting them.
PEFT_ENTRIES = (CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin", "README.md")
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
# Config fields that change what the adapter computes; any truthy value is refused.
_UNSUPPORTED = (
    "use_dora",
    "fan_in_fan_out",
    "lora_bias",
    "modules_to_save",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "layer_replication",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: the first pattern key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a PEFT adapter directory: {CONFIG_NAME} not found")
    config = json.loads(path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    bad = [k for k in _UNSUPPORTED if config.get(k)]
    if config.get("bias", "none") != "none":
        bad.append(f"bias={config['bias']!r}")
    if bad:
        raise ValueError(f"{path}: unsupported LoRA variant(s) {bad}; only plain LoRA on nn.Linear can be loaded")
    return config


def load_peft_adapter(
    model: nn.Module, path: Union[str, Path], adapter: Union[int, str], *, module_prefix: str = ""
) -> list[str]:
    """Load a PEFT LoRA directory into adapter slot ``adapter`` of every MultiLoRALinear of ``model``.

    Args:
        model: a model prepared with :func:`~latentembed.modules.lora.apply_multi_lora` whose
            module names, after ``module_prefix``, match the module names PEFT saved.
        path: the directory PEFT's ``save_pretrained`` wrote.
        adapter: the slot (name or id) to overwrite. Wrapped layers the file has no weights for
            get rank 0 for this adapter (the file defines the whole adapter).
        module_prefix: prepended to PEFT's module names to find ours (e.g. ``"backbone."``).

    Each module's rank must be <= the layer's r_max. Returns the loaded module names. The
    config's ``lora_dropout`` is not applied (dropout is a property of our layer).

    Example:
        >>> load_peft_adapter(model, "adapters/query", "retrieval.query")  # doctest: +SKIP
    """
    from safetensors.torch import load_file

    directory = Path(path)
    config = _read_config(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{directory}: {WEIGHTS_NAME} not found (only safetensors adapters are supported)")
    tensors = load_file(str(weights_path))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(
                f"{weights_path}: unsupported tensor {key!r}; expected "
                "base_model.model.<module>.lora_A.weight / lora_B.weight"
            )
        pairs.setdefault(match["module"], {})[match["which"]] = value
    layers = dict(multi_lora_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MultiLoRALinear layers; call apply_multi_lora first")
    missing = [module_prefix + m for m in pairs if module_prefix + m not in layers]
    if missing:
        raise KeyError(
            f"{directory}: adapter modules {missing[:4]} are not MultiLoRALinear layers of the model "
            f"(with module_prefix={module_prefix!r}); wrapped layers: {list(layers)[:4]}"
        )
    updates = []
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{weights_path}: module {module!r} has lora_{'A' if 'A' in ab else 'B'} only")
        rank = ab["A"].shape[0]
        expected = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        if rank != expected:
            raise ValueError(f"{weights_path}: module {module!r} has rank {rank}, the config says {expected}")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        layer = layers[module_prefix + module]
        if rank > layer.r_max:
            raise ValueError(
                f"{weights_path}: module {module!r} has rank {rank} > r_max = {layer.r_max} of {module_prefix + module}"
            )
        updates.append((layer, ab["A"], ab["B"], scaling))
    # Everything is checked before the first layer changes: a bad file leaves the model as it was.
    t = next(iter(layers.values())).routing.adapter_id(adapter, "adapter")
    for layer, a, b, scaling in updates:
        layer.set_adapter_weights(t, a, b, scaling)
    loaded = {id(layer) for layer, *_ in updates}
    for layer in layers.values():
        if id(layer) not in loaded:
            layer.set_adapter_weights(
                t, layer.lora_a.new_zeros(0, layer.in_features), layer.lora_b.new_zeros(layer.out_features, 0), 0.0
            )
    return [module_prefix + m for m in pairs]


def _dropout_p(layer) -> float:
    """The adapter-input dropout probability a layer trains with (PEFT's ``lora_dropout``)."""
    p = getattr(layer, "dropout_p", None)
    return float(p if p is not None else getattr(getattr(layer, "dropout", None), "p", 0.0))


def save_peft_adapter(
    model: nn.Module,
    adapter: Union[int, str],
    path: Union[str, Path],
    *,
    module_prefix: str = "",
    base_model_name_or_path: Optional[str] = None,
) -> Path:
    """Write adapter ``adapter`` of ``model`` as a PEFT LoRA directory (loadable by PeftModel).

    Layers where the adapter has rank 0 are left out. ``module_prefix`` is stripped from our
    module names (inverse of :func:`load_peft_adapter`). Alpha is written as ``scaling * rank``
    (``use_rslora`` false), the most common rank / alpha as ``r`` / ``lora_alpha`` and the rest
    as escaped full-name ``rank_pattern`` / ``alpha_pattern`` entries. The directory is replaced
    whole and all-or-nothing (:func:`latentembed.atomic_io.atomic_directory`); one holding
    entries other than :data:`PEFT_ENTRIES` raises FileExistsError. Returns the directory.

    Example:
        >>> save_peft_adapter(model, "retrieval.query", "out/query")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    layers = dict(multi_lora_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MultiLoRALinear layers")
    t = next(iter(layers.values())).routing.adapter_id(adapter, "adapter")
    if t < 0:
        raise ValueError("adapter -1 is the base layer and cannot be saved")
    tensors, ranks, alphas = {}, {}, {}
    for name, layer in layers.items():
        if layer.merged_adapter is not None:
            raise RuntimeError(f"{name}: an adapter is merged into the weight; unmerge() before saving")
        a, b, scaling = layer.adapter_weights(t)
        if a.shape[0] == 0:
            continue
        if not name.startswith(module_prefix):
            raise ValueError(f"layer {name!r} does not start with module_prefix {module_prefix!r}")
        module = name[len(module_prefix) :]
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = b.detach().cpu().contiguous()
        ranks[module], alphas[module] = a.shape[0], scaling * a.shape[0]
    if not tensors:
        raise ValueError(f"adapter {adapter!r} has rank 0 in every layer: nothing to save")

    def most_common(values: dict):
        counts: dict = {}
        for v in values.values():
            counts[v] = counts.get(v, 0) + 1
        return max(counts, key=counts.get)

    r, alpha = most_common(ranks), most_common(alphas)
    leaves = sorted({m.rpartition(".")[2] for m in ranks})
    # A leaf name is a valid target when every layer so named carries the adapter; otherwise
    # list full module names so PEFT does not add zero adapters elsewhere.
    complete = all(
        all(
            m in ranks
            for m in (
                n[len(module_prefix) :] for n in layers if n.rpartition(".")[2] == leaf and n.startswith(module_prefix)
            )
        )
        for leaf in leaves
    )
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": max((_dropout_p(layer) for layer in layers.values()), default=0.0),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "target_modules": leaves if complete else sorted(ranks),
        "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(m): v for m, v in alphas.items() if v != alpha},
    }
    directory = Path(path)
    with atomic_directory(directory, owned=PEFT_ENTRIES) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_NAME))
    return directory
