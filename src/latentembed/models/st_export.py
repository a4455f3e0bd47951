"""Export an embedding model as a classic sentence-transformers directory (also read by TEI, vLLM
and MTEB).

The layout is written directly, not through sentence-transformers' own ``save`` (whose newer
layout TEI cannot parse)::

    config.json                        the backbone's HF config; "is_causal": false and
                                       "use_bidirectional_attention": true for a bidirectional model
    model.safetensors                  the backbone, HF names without a prefix, adapter merged
    tokenizer.json (+ tokenizer_config.json)  EOS appended by the post-processor when the model
                                       appends it (``add_eos``), as last-token pooling needs
    modules.json                       Transformer -> Pooling -> Normalize (if normalised)
    1_Pooling/config.json              the boolean ``pooling_mode_*`` keys and ``include_prompt``
    sentence_bert_config.json          max_seq_length (the model's max_length)
    config_sentence_transformers.json  the prompts of the model's template (every task, plus
                                       "query" / "document")

Latent-attention pooling is no standard module: the directory gets a custom module (the code
file ``latentembed_latent_attention.py`` at its root, loaded with ``trust_remote_code=True``):
Transformer -> ``1_LatentAttention`` -> ``2_Pooling`` (mean) -> ``3_Normalize``, and an
``architectures`` name no server knows plus no ``1_Pooling`` folder, so TEI and vLLM refuse the
directory instead of mean-pooling raw states.

A model with one adapter is exported merged; a model with several has no single set of weights:
pass ``adapter=`` (one directory per adapter: :func:`save_sentence_transformers_per_adapter`).

Where sentence-transformers would pool other tokens than latentembed (its ``include_prompt:
false`` drops the first ``len(tokenize(prompt))`` positions, BOS included, while latentembed's
``mask_instruction="exact"`` drops exactly the tokens inside the prompt), the export warns with
an :class:`ExportWarning` naming the prompt; see the README's "Export and serve".
"""

from __future__ import annotations

import json
import warnings
from importlib import resources
from pathlib import Path
from typing import Optional, Union

from safetensors.torch import save_file
from torch import nn

from ..atomic_io import atomic_directory
from ..modules.lora import multi_lora_layers
from ..prompts import get_template, resolve_prompt, role_task
from ..tokenization import TextTokenizer, tokenize_with_prompts
from .checkpoint import CHECKPOINT_ENTRIES

__all__ = [
    "ST_FORMAT",
    "ExportWarning",
    "save_sentence_transformers",
    "save_sentence_transformers_per_adapter",
    "st_prompts",
]

ST_FORMAT = "sentence-transformers"
REMOTE_MODULE = "latentembed_latent_attention"
LATENT_ARCHITECTURE = "LatentEmbedLatentAttentionModel"
#: Our pooling mode -> the key of 1_Pooling/config.json set to true (latent attention: its mean).
ST_POOLING_KEYS = {
    "mean": "pooling_mode_mean_tokens",
    "last": "pooling_mode_lasttoken",
    "first": "pooling_mode_cls_token",
    "weighted_mean": "pooling_mode_weightedmean_tokens",
    "latent_attention": "pooling_mode_mean_tokens",
}
_ALL_POOLING_KEYS = (
    "pooling_mode_cls_token",
    "pooling_mode_mean_tokens",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)
_ST_MODULE = "sentence_transformers.models."
#: Top-level entries an export writes (a re-export replaces them; anything else is refused).
ST_ENTRIES = (
    *CHECKPOINT_ENTRIES,
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "[0-9]_*",
    REMOTE_MODULE + ".py",
)
# Texts on which the prompt exclusion of the two libraries is compared (a word, a sentence, one
# character: the token merges at the prompt's end differ between them).
_PROBES = ("hello world", "Paris is the capital of France.", "x")


class ExportWarning(UserWarning):
    """An exported directory loads, but one consumer computes something else than latentembed."""


def _export_adapter(model: nn.Module, adapter: Optional[str]) -> Optional[str]:
    """The adapter whose weights the export merges (``None``: the weights as they are)."""
    names = tuple(model.adapter_names)
    merged = {layer.merged_adapter for _, layer in multi_lora_layers(model.backbone)} - {None}
    if merged:
        (index,) = merged
        if adapter not in (None, names[index]):
            raise ValueError(f"adapter={adapter!r}, but adapter {names[index]!r} is merged into the weights")
        return None
    if adapter is not None and adapter not in names and adapter != "base":
        raise ValueError(f"adapter={adapter!r} is not an adapter of the model; expected one of {list(names)} or 'base'")
    if len(names) > 1 and adapter is None:
        raise ValueError(
            f"the model has {len(names)} adapters {list(names)} and a sentence-transformers directory holds one "
            "set of weights: pass adapter=<name> (one directory per adapter: "
            "save_sentence_transformers_per_adapter, or `latentembed convert --per-adapter`)"
        )
    if adapter is None and len(names) == 1:
        return names[0]
    return None if adapter == "base" else adapter


def _backbone_state(model: nn.Module, adapter: Optional[str]) -> dict:
    """The backbone's tensors under HF names, ``adapter`` folded into the weights (float32 sum)."""
    state = dict(model.backbone.state_dict())
    for name, layer in multi_lora_layers(model.backbone):
        for part in ("lora_a", "lora_b", "_extra_state"):
            state.pop(f"{name}.{part}", None)
        if adapter is not None:
            weight = layer.weight.detach()
            delta = layer.delta_weight(adapter)
            state[f"{name}.weight"] = (weight.to(delta.dtype) + delta).to(weight.dtype)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def st_prompts(model: nn.Module, adapter: Optional[str] = None) -> dict:
    """``{prompt name: prefix}`` of the model's template: every task (those of ``adapter`` when
    the template maps tasks to adapters) plus ``"query"`` / ``"document"`` (the template's query
    and document tasks, ``""`` when it has none).

    Example:
        >>> st_prompts(model)["query"]  # doctest: +SKIP
        'Instruct: Given a question, retrieve passages that answer the question\\nQuery: '
    """
    template = get_template(model.config.prompt_template)
    prompts = {}
    for task, prompt in template.tasks.items():
        if prompt.adapter is None or adapter is None or prompt.adapter == adapter:
            prompts[task] = resolve_prompt(template, task=task).prefix
    for role in ("query", "document"):
        task = role_task(template, role)
        prompts.setdefault(role, prompts.get(task, "") if task is not None else "")
    return prompts


def _exported_tokenizer(tokenizer: TextTokenizer, add_eos: bool, max_length: int):
    """(tokenizers.Tokenizer, tokenizer_config dict): ``tokenizer`` whose post-processor appends
    EOS when ``add_eos`` and it does not already end every text with it."""
    import tokenizers

    backend = tokenizer.tokenizer if tokenizer.backend == "tokenizers" else tokenizer.tokenizer.backend_tokenizer
    exported = tokenizers.Tokenizer.from_str(backend.to_str())
    exported.no_truncation()
    exported.no_padding()
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if add_eos and exported.encode("x").ids[-1:] != [eos_id]:
        exported = _append_eos(exported, eos, eos_id)
    pad = tokenizer.pad_token or eos
    config = {
        # the plain fast class reads tokenizer.json as it is (model-specific classes may rebuild
        # the post-processor from add_bos_token / add_eos_token and drop the appended EOS)
        "tokenizer_class": "PreTrainedTokenizerFast",
        "padding_side": "right",
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        **{k: v for k, v in (("bos_token", tokenizer.bos_token), ("eos_token", eos), ("pad_token", pad)) if v},
    }
    return exported, config


def _append_eos(tokenizer, eos: str, eos_id: int):
    """``tokenizer`` (a tokenizers.Tokenizer) with ``eos`` after every sequence: added to the
    post-processor's template where it has one (a Sequence of two templates would put the second
    template's EOS after the first's BOS), else after whatever post-processor it has."""
    import tokenizers

    data = json.loads(tokenizer.to_str())
    post = data.get("post_processor")
    steps = post["processors"] if post is not None and post.get("type") == "Sequence" else [post]
    template = next((p for p in steps if p is not None and p.get("type") == "TemplateProcessing"), None)
    special = {"id": eos, "ids": [eos_id], "tokens": [eos]}
    if template is not None:
        template["single"].append({"SpecialToken": {"id": eos, "type_id": 0}})
        if template.get("pair"):
            last_type = template["pair"][-1].get("Sequence", template["pair"][-1].get("SpecialToken", {}))
            template["pair"].append({"SpecialToken": {"id": eos, "type_id": last_type.get("type_id", 1)}})
        template["special_tokens"][eos] = special
    else:
        append = {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": eos, "type_id": 0}}],
            "pair": [
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": eos, "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
                {"SpecialToken": {"id": eos, "type_id": 1}},
            ],
            "special_tokens": {eos: special},
        }
        data["post_processor"] = append if post is None else {"type": "Sequence", "processors": [post, append]}
    return tokenizers.Tokenizer.from_str(json.dumps(data))


def _prompt_mismatches(model: nn.Module, exported, prompts: dict) -> list:
    """Where sentence-transformers' prompt exclusion (the first ``len(tokenize(prompt))`` positions,
    less a trailing special token) pools other positions than latentembed's mask; one line each."""
    cfg = model.config
    specials = {t for t in (model.tokenizer.bos_token_id, model.tokenizer.eos_token_id) if t is not None}
    problems = []
    for name, prefix in sorted(prompts.items()):
        if not prefix:
            continue
        ids = exported.encode(prefix).ids
        n = len(ids) - (1 if ids and ids[-1] in specials else 0)
        ours = tokenize_with_prompts(
            model.tokenizer, list(_PROBES), prefix, add_eos=cfg.add_eos, mask_instruction=cfg.mask_instruction
        )
        for text, mask in zip(_PROBES, ours.pool_mask):
            theirs = [j >= n for j in range(len(mask))]
            if mask != theirs:
                dropped = [j for j in range(len(mask)) if not mask[j]]
                problems.append(
                    f"prompt {name!r} on {text!r}: sentence-transformers excludes positions 0..{n - 1}, "
                    f"latentembed ({cfg.mask_instruction!r} mask) excludes {dropped}"
                )
                break
        if cfg.pooling == "weighted_mean":
            problems.append(
                f"prompt {name!r}: weighted mean after the prompt weighs by position in sentence-transformers "
                "and by rank among the pooled tokens in latentembed"
            )
    return problems


def _check_exportable(model: nn.Module) -> None:
    if model.tokenizer is None:
        raise ValueError(
            "a sentence-transformers directory needs the tokenizer: set model.tokenizer (or load the model "
            "from a directory with tokenizer.json) before exporting"
        )
    if model.config.pooling not in ST_POOLING_KEYS:
        raise ValueError(
            f"pooling {model.config.pooling!r} has no sentence-transformers equivalent; exportable: "
            f"{sorted(ST_POOLING_KEYS)}"
        )


def write_sentence_transformers(model: nn.Module, directory: Path, *, adapter: Optional[str] = None) -> None:
    """Write the export into the existing, empty ``directory`` (plain writes: callers make it
    atomic). Arguments as :func:`save_sentence_transformers`."""
    _check_exportable(model)
    cfg = model.config
    merged_adapter = _export_adapter(model, adapter)
    latent = cfg.pooling == "latent_attention"
    include_prompt = cfg.mask_instruction == "none" or cfg.pooling == "last"
    exported, tok_config = _exported_tokenizer(model.tokenizer, cfg.add_eos, cfg.max_length)
    prompts = st_prompts(model, merged_adapter if adapter != "base" else None)
    if not include_prompt:
        problems = _prompt_mismatches(model, exported, prompts)
        if problems:
            warnings.warn(
                "sentence-transformers will pool other tokens than latentembed for these prompts (its "
                "encode will differ from latentembed's when they are used):\n  " + "\n  ".join(problems),
                ExportWarning,
                stacklevel=3,
            )
    hf = model.backbone.config.to_hf_dict()
    hf.update(is_causal=bool(cfg.causal), use_bidirectional_attention=not cfg.causal)
    hf["dtype"] = str(next(model.backbone.parameters()).dtype).removeprefix("torch.")  # as written
    hf["architectures"] = [LATENT_ARCHITECTURE if latent else _hf_class(hf["model_type"])]
    dim = model.backbone.config.hidden_size
    modules = [{"idx": 0, "name": "0", "path": "", "type": _ST_MODULE + "Transformer"}]
    if latent:
        modules.append(
            {"idx": 1, "name": "1", "path": "1_LatentAttention", "type": REMOTE_MODULE + ".LatentAttentionBlock"}
        )
    pooling_dir = f"{len(modules)}_Pooling"
    modules.append(
        {"idx": len(modules), "name": str(len(modules)), "path": pooling_dir, "type": _ST_MODULE + "Pooling"}
    )
    if cfg.normalize:
        n = len(modules)
        modules.append({"idx": n, "name": str(n), "path": f"{n}_Normalize", "type": _ST_MODULE + "Normalize"})
    pooling = {"word_embedding_dimension": dim, **{k: k == ST_POOLING_KEYS[cfg.pooling] for k in _ALL_POOLING_KEYS}}
    pooling["include_prompt"] = include_prompt

    _write_json(directory / "config.json", hf)
    save_file(_backbone_state(model, merged_adapter), str(directory / "model.safetensors"), metadata={"format": "pt"})
    exported.save(str(directory / "tokenizer.json"))
    _write_json(directory / "tokenizer_config.json", tok_config)
    _write_json(directory / "modules.json", modules)
    _write_json(directory / pooling_dir / "config.json", pooling)
    if cfg.normalize:
        (directory / modules[-1]["path"]).mkdir()
    _write_json(directory / "sentence_bert_config.json", {"max_seq_length": cfg.max_length, "do_lower_case": False})
    _write_json(
        directory / "config_sentence_transformers.json",
        {"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"},
    )
    if latent:
        _write_latent_module(model, directory)


def _write_latent_module(model: nn.Module, directory: Path) -> None:
    block = model.pooling.latent_attention
    source = resources.files(__package__).joinpath("st_latent_attention_module.py").read_text()
    (directory / f"{REMOTE_MODULE}.py").write_text(source)
    sub = directory / "1_LatentAttention"
    sub.mkdir()
    config = dict(
        hidden_size=block.hidden_size,
        num_latents=block.num_latents,
        num_heads=block.num_heads,
        dim_head=block.dim_head,
        ff_mult=block.ff_mult,
        latent_dim=block.latent_dim,
    )
    _write_json(sub / "config.json", config)
    state = {k: v.detach().contiguous().cpu() for k, v in block.state_dict().items() if not k.endswith("_extra_state")}
    save_file(state, str(sub / "model.safetensors"), metadata={"format": "pt"})


def _hf_class(model_type: str) -> str:
    return {"mistral": "MistralModel", "llama": "LlamaModel", "qwen2": "Qwen2Model"}.get(model_type, "AutoModel")


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def save_sentence_transformers(model: nn.Module, path: Union[str, Path], *, adapter: Optional[str] = None) -> Path:
    """Write ``model`` as a classic sentence-transformers directory ``path`` (layout: module
    docstring), all-or-nothing like every save. ``SentenceTransformer(path)`` then encodes as
    ``model.encode`` does (``trust_remote_code=True`` for latent-attention pooling); prompts go
    by name (``encode(texts, prompt_name="query")``).

    Args:
        model: an :class:`~latentembed.models.embedding.EmbeddingModel` with a tokenizer.
        adapter: for a multi-adapter model, the adapter to merge (``"base"``: none); a
            one-adapter model merges its adapter by default.

    Raises ValueError for a model without tokenizer, a multi-adapter model without ``adapter``
    or an unknown adapter. Warns (:class:`ExportWarning`) where sentence-transformers would
    exclude other prompt tokens than latentembed.

    Example:
        >>> model.save_pretrained("out/st", format="sentence-transformers")  # doctest: +SKIP
        >>> SentenceTransformer("out/st").encode(["a query"], prompt_name="query")  # doctest: +SKIP
    """
    _check_exportable(model)
    _export_adapter(model, adapter)  # fail before touching the directory
    with atomic_directory(path, owned=ST_ENTRIES) as tmp:
        write_sentence_transformers(model, tmp, adapter=adapter)
    return Path(path)


def save_sentence_transformers_per_adapter(model: nn.Module, path: Union[str, Path]) -> list:
    """One sentence-transformers directory per adapter, ``path/<adapter>`` (each merged with its
    adapter and holding the prompts of its tasks); ``path`` replaced whole, all-or-nothing.
    Returns the directories."""
    if not model.adapter_names:
        raise ValueError("the model has no adapters: export it with save_sentence_transformers")
    _check_exportable(model)
    with atomic_directory(path, owned=lambda entry: entry.is_dir()) as tmp:
        for name in model.adapter_names:
            (tmp / name).mkdir()
            write_sentence_transformers(model, tmp / name, adapter=name)
    return [Path(path) / name for name in model.adapter_names]
