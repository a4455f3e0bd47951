"""What an :class:`~latentembed.models.embedding.EmbeddingModel` is besides its backbone config.

Saved as ``latentembed.json`` next to the backbone's ``config.json``; :meth:`EmbeddingConfig.to_dict`
and :meth:`EmbeddingConfig.from_dict` round-trip exactly, and unknown keys are errors (a typo in
a hand-written file should not be ignored silently).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Union

from ..modules.pooling import POOLING_MODES
from ..tokenization import MASK_MODES

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    """The multi-LoRA adapters on the backbone's linear layers (see ``apply_multi_lora``).

    ``adapters`` are the adapter names (a jina-v3 style model has one per task); every adapter
    has the same ``rank`` / ``alpha`` at creation (loaded PEFT adapters keep their own ranks,
    up to ``r_max``)."""

    adapters: list = field(default_factory=list)
    rank: int = 16
    alpha: float = 32.0
    r_max: Optional[int] = None
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: list = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))


@dataclass
class EmbeddingConfig:
    """Pooling, normalisation, prompts and adapters of an embedding model.

    Args:
        pooling: one of ``POOLING_MODES``.
        normalize: L2-normalise the embeddings (the forward's output).
        latent_attention: ``LatentAttentionPooling`` arguments (num_latents, num_heads, dim_head,
            ff_mult, latent_dim) for ``pooling="latent_attention"``.
        causal: run the backbone with causal attention (E5-mistral) instead of bidirectional.
        prompt_template: a template name of :data:`latentembed.prompts.TEMPLATES` or a
            template dict (``PromptTemplate.to_dict()``).
        mask_instruction: ``"exact"`` (pool none of the instruction tokens), ``"nvembed_compat"``
            (NV-Embed's off-by-one: its checkpoints were trained with it) or ``"none"``.
        add_eos: append the EOS token to every text (needed by ``"last"`` pooling; NV-Embed and
            E5 do it for every pooling).
        max_length: default truncation length in tokens, instruction and specials included.
        lora: the adapters (``None``: no multi-LoRA layers).
    """

    pooling: str = "mean"
    normalize: bool = True
    latent_attention: Optional[dict] = None
    causal: bool = False
    prompt_template: Union[str, dict] = "none"
    mask_instruction: str = "exact"
    add_eos: bool = True
    max_length: int = 512
    lora: Optional[LoRAConfig] = None

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig(**_known("lora", self.lora, LoRAConfig))
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {self.pooling!r}")
        if self.mask_instruction not in MASK_MODES:
            raise ValueError(f"mask_instruction must be one of {MASK_MODES}, got {self.mask_instruction!r}")
        if self.latent_attention is not None and self.pooling != "latent_attention":
            raise ValueError(f"latent_attention arguments given for pooling {self.pooling!r}")
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {self.max_length!r}")
        if self.lora is not None:
            names = self.lora.adapters
            if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"lora.adapters must be unique non-empty names, got {names!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EmbeddingConfig:
        return cls(**_known("latentembed config", data, cls))


def _known(what: str, data: dict, cls) -> dict:
    if not isinstance(data, dict):
        raise TypeError(f"{what} must be a JSON object, got {type(data).__name__}")
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{what} has unknown keys {unknown}; allowed: {sorted(allowed)}")
    return dict(data)
