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

_INT, _NUMBER, _BOOL = "an integer", "a number", "a boolean"
# Field -> expected kind, for DecoderConfig's fields and for config.json's (HF names). A wrong
# type must fail here: bool("false") is True and float("1e-6") parses, so a later cast would
# hide it. In config.json any field may be null or absent (the required sizes are reported as
# missing); in DecoderConfig only the _NULLABLE ones may be None.
_CONFIG_TYPES = {
    "vocab_size": _INT,
    "hidden_size": _INT,
    "intermediate_size": _INT,
    "num_hidden_layers": _INT,
    "num_attention_heads": _INT,
    "num_key_value_heads": _INT,
    "head_dim": _INT,
    "max_position_embeddings": _INT,
    "sliding_window": _INT,
    "pad_token_id": _INT,
    "rms_norm_eps": _NUMBER,
    "rope_theta": _NUMBER,
    "qkv_bias": _BOOL,
    "o_bias": _BOOL,
    "mlp_bias": _BOOL,
    "tie_word_embeddings": _BOOL,
    "attention_bias": _BOOL,
    "use_sliding_window": _BOOL,
}
_ROPE_TYPES = {
    "rope_theta": _NUMBER,
    "factor": _NUMBER,
    "low_freq_factor": _NUMBER,
    "high_freq_factor": _NUMBER,
    "original_max_position_embeddings": _INT,
}
_NULLABLE = frozenset({"num_key_value_heads", "head_dim", "sliding_window", "pad_token_id"})
_POSITIVE = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)


def _check_kind(field: str, value: object, kind: str, nullable: bool = True) -> None:
    """Raise TypeError unless ``value`` is of ``kind`` (or ``None`` where nullable); bools are
    not numbers."""
    if value is None and nullable:
        return
    if kind == _BOOL:
        ok = isinstance(value, bool)
    elif isinstance(value, bool):
        ok = False
    else:
        ok = isinstance(value, int) or (kind == _NUMBER and isinstance(value, float))
    if not ok:
        raise TypeError(f"{field} must be {kind}, got {value!r} ({type(value).__name__})")


def _check_types(fields: dict, prefix: str = "", nullable=frozenset(_CONFIG_TYPES)) -> None:
    """Types of the known ``fields`` (and of rope_scaling / rope_parameters' entries); the error
    names the field as ``prefix + name``. Absent fields pass; present ones may be None only if
    listed in ``nullable``."""
    for name, kind in _CONFIG_TYPES.items():
        if name in fields:
            _check_kind(prefix + name, fields[name], kind, name in nullable)
    for rope_name in ("rope_scaling", "rope_parameters"):
        rope = fields.get(rope_name)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise TypeError(
                f"{prefix}{rope_name} must be an object (dict) or null, got {rope!r} ({type(rope).__name__})"
            )
        for name, kind in _ROPE_TYPES.items():
            _check_kind(f"{prefix}{rope_name}.{name}", rope.get(name), kind)


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
        _check_types(vars(self), nullable=_NULLABLE)
        for name in _POSITIVE:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if self.num_hidden_layers < 0:
            raise ValueError(f"num_hidden_layers must be >= 0, got {self.num_hidden_layers}")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise ValueError(f"rms_norm_eps and rope_theta must be > 0, got {self.rms_norm_eps} and {self.rope_theta}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type must be one of {SUPPORTED_MODEL_TYPES}, got {self.model_type!r}")
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
            raise ValueError(f"rope_scaling rope_type must be one of {SUPPORTED_ROPE_TYPES}, got {rope_type!r}")
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
    def from_hf_config(cls, source: Union[str, Path, dict]) -> DecoderConfig:
        """Build from a HF ``config.json``: a directory holding one, the file, or its dict.

        Errors (invalid JSON, a field of the wrong type, a bad value) name the file (or
        "config dict"), the field, what was expected and what came.

        Example:
            >>> cfg = DecoderConfig.from_hf_config("path/to/Mistral-7B")  # doctest: +SKIP
        """
        if isinstance(source, dict):
            hf, where = dict(source), "config dict"
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"no config.json at {path}")
            where = str(path)
            try:
                hf = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} (char {e.pos})"
                ) from e
            if not isinstance(hf, dict):
                raise ValueError(f"{where} must hold a JSON object (a dict of fields), got {type(hf).__name__}")
        try:
            return cls._from_hf_dict(hf)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from e

    @classmethod
    def _from_hf_dict(cls, hf: dict) -> DecoderConfig:
        prefix = ""
        model_type = MODEL_TYPE_ALIASES.get(hf.get("model_type"), hf.get("model_type"))
        text = hf.get("text_config")
        if model_type not in SUPPORTED_MODEL_TYPES and isinstance(text, dict):
            # Wrapper configs (NV-Embed's "nvembed") nest the backbone's config as text_config.
            hf, prefix = dict(text), "text_config."
            model_type = MODEL_TYPE_ALIASES.get(hf.get("model_type"), hf.get("model_type"))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config model_type must be one of {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if hf.get(k) is None]
        if missing:
            raise ValueError(f"config ({model_type}) lacks required fields {missing}")
        _check_types(hf, prefix)
        # transformers 5 nests rope_theta and the scaling in rope_parameters; older configs
        # keep rope_theta at the top level and the scaling in rope_scaling (type or rope_type).
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        theta = rope.pop("rope_theta", None)
        theta = hf.get("rope_theta") if theta is None else theta
        theta = 10000.0 if theta is None else theta  # (an `or` chain would turn 0 into 10000)
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
