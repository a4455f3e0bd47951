"""A native MTEB encoder for :class:`~latentembed.models.embedding.EmbeddingModel`.

:class:`MTEBEncoder` implements MTEB's (2.x) ``EncoderProtocol``: ``encode(inputs: DataLoader,
*, task_metadata, hf_split, hf_subset, prompt_type)``, ``similarity``, ``similarity_pairwise``
and ``mteb_model_meta``, so ``mteb.evaluate(MTEBEncoder(model), tasks)`` runs the model in
latentembed (packed batches sorted by length, exact instruction masks, multi-LoRA routing)
instead of through a sentence-transformers export.

Prompts: MTEB's prompt type picks the side. Queries take, in order, an instruction given for the
task (``instructions={"NFCorpus": "Given a question, ..."}``), the task's description when
``use_task_description``, an instruction carried by the query rows (instruction-retrieval tasks),
else the template's query task (:func:`~latentembed.prompts.role_task`: ``retrieval``,
``search_query``, ``retrieval.query``); documents take the template's document task (most
templates: no prompt). Tasks without a prompt type (STS, classification, clustering) are
encoded as queries, as sentence-transformers' MTEB wrapper does with a ``"query"`` prompt.

Only this module imports ``mteb`` (lazily, for the model metadata), so latentembed works without it.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch

from ..prompts import role_task

__all__ = ["MTEBEncoder"]


def _texts(inputs: Iterable[Mapping[str, Any]]) -> tuple[list[str], list[Optional[str]]]:
    """The texts of every batch of an MTEB DataLoader, and the per-row instructions (or None)."""
    texts, instructions = [], []
    for batch in inputs:
        if "text" not in batch:
            raise ValueError(f"MTEBEncoder reads text batches; got a batch with keys {sorted(batch)}")
        rows = list(batch["text"])
        texts.extend(rows)
        instructions.extend(batch.get("instruction") or [None] * len(rows))
    return texts, instructions


class MTEBEncoder:
    """``EncoderProtocol`` of MTEB over an EmbeddingModel.

    Args:
        model: the :class:`~latentembed.models.embedding.EmbeddingModel` (with a tokenizer).
        name: the model name MTEB records in its results (default ``"latentembed/model"``).
        instructions: ``{MTEB task name: query instruction}``, formatted by the model's template.
        use_task_description: use the task's description as the query instruction when
            ``instructions`` has none for it (E5 / NV-Embed style evaluation).
        batch_size: texts per forward (``encode`` sorts them by length first).

    Example::

        >>> import mteb  # doctest: +SKIP
        >>> results = mteb.evaluate(MTEBEncoder(model), mteb.get_tasks(["NFCorpus"]), cache=None)  # doctest: +SKIP
    """

    def __init__(
        self,
        model,
        *,
        name: str = "latentembed/model",
        instructions: Optional[Mapping[str, str]] = None,
        use_task_description: bool = False,
        batch_size: int = 32,
    ) -> None:
        if not hasattr(model, "encode") or not hasattr(model, "config"):
            raise TypeError(f"model: expected a latentembed EmbeddingModel, got {type(model).__name__}")
        self.model = model
        self.name = name
        self.instructions = dict(instructions or {})
        self.use_task_description = use_task_description
        self.batch_size = batch_size

    def prompt_for(self, task_name: str, description: Optional[str], prompt_type: Optional[str]) -> dict:
        """The ``encode`` keywords (``task`` / ``instruction``) of one side of one task."""
        side = "document" if prompt_type in ("document", "passage") else "query"
        if side == "query":
            if task_name in self.instructions:
                return {"instruction": self.instructions[task_name]}
            if self.use_task_description and description:
                return {"instruction": description}
        return {"task": role_task(self.model.config.prompt_template, side)}

    def encode(
        self,
        inputs,
        *,
        task_metadata,
        hf_split: str,
        hf_subset: str,
        prompt_type=None,
        **kwargs: Any,
    ) -> np.ndarray:
        """[N, D] float32 embeddings of every text in ``inputs`` (an MTEB DataLoader of batches
        with a ``"text"`` list), in order."""
        texts, row_instructions = _texts(inputs)
        kind = getattr(prompt_type, "value", prompt_type)
        prompt = self.prompt_for(task_metadata.name, getattr(task_metadata, "description", None), kind)
        batch_size = kwargs.get("batch_size", self.batch_size)
        if not texts:
            return np.zeros((0, self._dim()), np.float32)
        if kind != "document" and "instruction" not in prompt and any(row_instructions):
            # instruction retrieval: each query row brings its own instruction; one encode per
            # distinct instruction, results put back in row order
            out = np.zeros((len(texts), self._dim()), np.float32)
            groups: dict = {}
            for i, instruction in enumerate(row_instructions):
                groups.setdefault(instruction or None, []).append(i)
            for instruction, rows in groups.items():
                kw = {"instruction": instruction} if instruction else prompt
                out[rows] = self.model.encode([texts[i] for i in rows], batch_size=batch_size, convert_to="numpy", **kw)
            return out
        return self.model.encode(texts, batch_size=batch_size, convert_to="numpy", **prompt)

    def _dim(self) -> int:
        return self.model.backbone.config.hidden_size

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        """[N1, N2] cosine similarities (the model's embeddings are L2-normalised by default)."""
        a = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings1)).float(), dim=-1)
        b = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings2)).float(), dim=-1)
        return a @ b.T

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        """[N] cosine similarity of each pair."""
        a = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings1)).float(), dim=-1)
        b = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings2)).float(), dim=-1)
        return (a * b).sum(-1)

    @property
    def mteb_model_meta(self):
        """MTEB's ModelMeta: the name, embedding size, max tokens, cosine similarity."""
        from mteb.models.model_meta import ModelMeta, ScoringFunction

        config = self.model.config
        return ModelMeta.create_empty(
            {
                "name": self.name,
                "revision": "local",
                "embed_dim": self._dim(),
                "max_tokens": config.max_length,
                "similarity_fn_name": ScoringFunction.COSINE,
                "framework": ["PyTorch"],
                "use_instructions": bool(self.instructions) or self.use_task_description,
            }
        )
