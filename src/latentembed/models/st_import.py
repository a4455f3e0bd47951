"""Read the embedding settings of a classic sentence-transformers directory of a decoder.

:func:`st_embedding_settings` turns ``modules.json``, the Pooling module's ``config.json``,
``sentence_bert_config.json``, ``config_sentence_transformers.json`` and ``config.json``'s
attention flags into :class:`~latentembed.models.embedding_config.EmbeddingConfig` fields, so
that :func:`~latentembed.models.embedding_io.load_embedding_model` loads such a directory (ours,
from :mod:`~latentembed.models.st_export`, or one written by sentence-transformers itself in the
classic layout) and encodes as ``SentenceTransformer(dir).encode`` does:

* pooling: ``mean`` / ``lasttoken`` / ``cls`` / ``weightedmean`` -> mean / last / first /
  weighted_mean; our latent-attention module -> latent_attention (the head from its folder);
  other modes (max, mean_sqrt_len_tokens, several at once) are refused;
* ``include_prompt: false`` -> ``mask_instruction="exact"``, else ``"none"``;
* EOS is whatever the tokenizer's post-processor appends (``add_eos=False``);
* attention: bidirectional when config.json says ``"is_causal": false`` or
  ``"use_bidirectional_attention": true``, causal otherwise (what transformers runs);
* ``max_seq_length`` -> ``max_length``; the prompts -> a template whose tasks are the prompt
  names (``encode(texts, task="query")``); a Normalize module -> ``normalize``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

from ..atomic_io import read_json

__all__ = ["STSettings", "is_st_directory", "st_embedding_settings"]

_ST_MODES = {"mean": "mean", "lasttoken": "last", "cls": "first", "weightedmean": "weighted_mean"}
_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
LATENT_MODULE_TYPE = "latentembed_latent_attention.LatentAttentionBlock"


class STSettings(NamedTuple):
    """What a sentence-transformers directory says: ``config`` (EmbeddingConfig fields) and the
    folder of a latent-attention head (``None`` without one)."""

    config: dict
    latent_dir: Optional[Path]


def is_st_directory(path: Path) -> bool:
    """Whether ``path`` holds a sentence-transformers ``modules.json``."""
    return (Path(path) / "modules.json").is_file()


def _modes(pooling: dict) -> list:
    mode = pooling.get("pooling_mode")
    if mode is not None:
        return [mode] if isinstance(mode, str) else list(mode)
    found = [name for key, name in _LEGACY_KEYS.items() if pooling.get(key) is True]
    return found or ["mean"]


def st_embedding_settings(path: Path) -> STSettings:
    """The EmbeddingConfig fields of the sentence-transformers directory ``path`` (module
    docstring); ValueError naming the file for what latentembed cannot compute."""
    path = Path(path)
    modules = read_json(path / "modules.json", expect=list)
    types = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    if "Pooling" not in types:
        raise ValueError(f"{path / 'modules.json'} has no Pooling module; latentembed reads Transformer -> Pooling")
    pooling_file = path / types["Pooling"]["path"] / "config.json"
    pooling = read_json(pooling_file)
    modes = _modes(pooling)
    if len(modes) != 1 or modes[0] not in _ST_MODES:
        raise ValueError(
            f"{pooling_file}: pooling {modes} has no latentembed equivalent; supported: one of {sorted(_ST_MODES)}"
        )
    latent = next((m for m in modules if isinstance(m, dict) and m.get("type") == LATENT_MODULE_TYPE), None)
    unknown = [
        m.get("type")
        for m in modules
        if isinstance(m, dict)
        and m is not latent
        and m.get("type", "").rsplit(".", 1)[-1] not in ("Transformer", "Pooling", "Normalize")
    ]
    if unknown:
        raise ValueError(f"{path / 'modules.json'}: modules {unknown} are not read by latentembed")
    hf = read_json(path / "config.json")
    bidirectional = hf.get("is_causal") is False or hf.get("use_bidirectional_attention") is True
    config = {
        "pooling": "latent_attention" if latent is not None else _ST_MODES[modes[0]],
        "normalize": "Normalize" in types,
        "causal": not bidirectional,
        "add_eos": False,
        "mask_instruction": "none" if pooling.get("include_prompt", True) else "exact",
    }
    bert = path / "sentence_bert_config.json"
    if bert.is_file():
        max_len = read_json(bert).get("max_seq_length")
        if isinstance(max_len, int) and max_len > 0:
            config["max_length"] = max_len
    st_config = path / "config_sentence_transformers.json"
    prompts = read_json(st_config).get("prompts") if st_config.is_file() else None
    if prompts:
        if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
            raise ValueError(f"{st_config}: 'prompts' must map prompt names to strings")
        config["prompt_template"] = {
            "name": "sentence-transformers",
            "instruction_format": "{instruction}",
            "tasks": {name: {"prefix": prefix} for name, prefix in prompts.items()},
        }
    latent_dir = None
    if latent is not None:
        latent_dir = path / latent["path"]
        head = read_json(latent_dir / "config.json")
        config["latent_attention"] = {
            k: head[k] for k in ("num_latents", "num_heads", "dim_head", "ff_mult", "latent_dim")
        }
    return STSettings(config=config, latent_dir=latent_dir)
