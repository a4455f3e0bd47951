"""Configuration of the decoder backbone (Mistral, Llama and Qwen2 families).

:class:`DecoderConfig` holds the fields those families use. It is built directly or from a
Hugging Face ``config.json`` (:meth:`DecoderConfig.from_hf_config`), in either the older layout
(``rope_theta`` + ``rope_scaling`` at the top level) or the transformers 5 layout
(``rope_parameters``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

SUPPORTED_MODEL_TYPES = ("mistral", "llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
# model_type spellings of the same families in embedding checkpoints (NV-Embed's text_config).
MODEL_TYPE_ALIASES = {"bidir_mistral": "mistral", "bidir_llama": "llama", "bidir_qwen2": "qwen2"}


@dataclass
class DecoderConfig:
    """Shape and numerics of a decoder backbone.

    Attributes:
        model_type: ``"mistral"``, ``"llama"`` or ``"qwen2"``.
        vocab_size, hidden_size, intermediate_size, num_hidden_layers: the usual sizes.
        num_attention_heads / num_key_value_heads: query and key/value heads (grouped-query
            attention when fewer KV heads).
        head_dim: per-head width; ``hidden_size // num_attention_heads`` when ``None``.
        rms_norm_eps: epsilon of every RMSNorm.
        rope_theta: rotary base.
        rope_scaling: ``None`` or a dict with ``rope_type`` (``"llama3"``: ``factor``,
            ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``).
        qkv_bias / o_bias / mlp_bias: which projections carry a bias (Qwen2: q/k/v only).
        tie_word_embeddings: recorded for round trips; the backbone has no LM head.
        sliding_window: recorded only; attention is always full (embedding models such as
            NV-Embed and LLM2Vec run without the window, and inputs are shorter than it).

    Example:
        >>> cfg = DecoderConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
        ...                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> cfg.head_dim
        16
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: Optional[int] = None
    model_type: str = "mistral"
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 32768
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    pad_token_id: Optional[int] = None
    extra: dict = field(default_factory=dict, repr=False, compare=False)  # other config.json fields, kept for saving

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type must be one of {SUPPORTED_MODEL_TYPES}, got {self.model_type!r}"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}) when head_dim is not given"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling rope_type must be one of {SUPPORTED_ROPE_TYPES}, got {rope_type!r}"
            )
        if rope_type == "default":
            self.rope_scaling = None
        else:
            missing = {"factor", "low_freq_factor", "high_freq_factor"} - self.rope_scaling.keys()
            if missing:
                raise ValueError(f"rope_scaling of type llama3 lacks {sorted(missing)}")
            # On a copy: the caller's dict (perhaps shared by several configs) stays as given.
            self.rope_scaling = dict(self.rope_scaling)
            self.rope_scaling.setdefault("original_max_position_embeddings", self.max_position_embeddings)

    @classmethod
    def from_hf_config(cls, source: Union[str, Path, dict]) -> "DecoderConfig":
        """Build from a HF ``config.json``: a directory holding one, the file, or its dict.

        Example:
            >>> cfg = DecoderConfig.from_hf_config("path/to/Mistral-7B")  # doctest: +SKIP
        """
        if isinstance(source, dict):
            hf = dict(source)
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"no config.json at {path}")
            hf = json.loads(path.read_text())
        model_type = MODEL_TYPE_ALIASES.get(hf.get("model_type"), hf.get("model_type"))
        text = hf.get("text_config")
        if model_type not in SUPPORTED_MODEL_TYPES and isinstance(text, dict):
            # Wrapper configs (NV-Embed's "nvembed") nest the backbone's config as text_config.
            hf = dict(text)
            model_type = MODEL_TYPE_ALIASES.get(hf.get("model_type"), hf.get("model_type"))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config model_type must be one of {SUPPORTED_MODEL_TYPES}, got {model_type!r}"
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if hf.get(k) is None]
        if missing:
            raise ValueError(f"config ({model_type}) lacks required fields {missing}")
        # transformers 5 nests rope_theta and the scaling in rope_parameters; older configs
        # keep rope_theta at the top level and the scaling in rope_scaling (type or rope_type).
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
        rope.pop("partial_rotary_factor", None)
        attention_bias = bool(hf.get("attention_bias", False))
        qkv_bias = True if model_type == "qwen2" else attention_bias
        sliding = hf.get("sliding_window")
        if model_type == "qwen2" and not hf.get("use_sliding_window", False):
            sliding = None
        known = {
            "vocab_size": hf["vocab_size"],
            "hidden_size": hf["hidden_size"],
            "intermediate_size": hf["intermediate_size"],
            "num_hidden_layers": hf["num_hidden_layers"],
            "num_attention_heads": hf["num_attention_heads"],
            "num_key_value_heads": hf.get("num_key_value_heads"),
            "model_type": model_type,
            "head_dim": hf.get("head_dim"),
            "rms_norm_eps": hf.get("rms_norm_eps", 1e-5),
            "rope_theta": float(theta),
            "rope_scaling": rope if rope.get("rope_type", "default") != "default" else None,
            "max_position_embeddings": hf.get("max_position_embeddings", 32768),
            "qkv_bias": qkv_bias,
            "o_bias": attention_bias and model_type != "qwen2",
            "mlp_bias": bool(hf.get("mlp_bias", False)),
            "hidden_act": hf.get("hidden_act", "silu"),
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "sliding_window": sliding,
            "pad_token_id": hf.get("pad_token_id"),
        }
        return cls(**known, extra=hf)

    def to_hf_dict(self) -> dict:
        """A HF-style ``config.json`` dict (the original file's other fields are kept)."""
        out = dict(self.extra)
        mine = {k: v for k, v in asdict(self).items() if k not in ("extra", "qkv_bias", "o_bias", "rope_scaling")}
        out.update(mine)
        out["attention_bias"] = self.qkv_bias if self.model_type != "qwen2" else False
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope.update(self.rope_scaling)
        out["rope_parameters"] = rope
        out.pop("rope_scaling", None)
        return out
