"""The candidate rule of the masked logsumexp: which documents each query is scored against.

One named structure from the public functions down to the custom-op calls, where it is unpacked
by keyword (:meth:`CandidateRule.keywords`): doc_key [N] and pos_key [B] are both int64 vectors,
and passed by position a swap would run without an error and give a wrong loss.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Sequence

import torch

__all__ = ["CandidateRule"]


class CandidateRule(NamedTuple):
    """Query i's candidate set C(i) among N documents (B queries; every field optional).

    The positive ``pos_index[i]`` is always a candidate; any other document j is dropped when
      - ``doc_owner[j] != i`` (in-batch negatives off: query i sees only the documents it owns),
      - ``exclude_diagonal and j == i`` (query-query or document-document terms),
      - its raw score ``s_ij > threshold``, or ``s_ij > margin * pos_score[i]`` (bound in float32),
      - ``doc_key[j] == pos_key[i]`` (an exact duplicate of row i's positive).

    Fields:
        pos_index: [B] int64, each query's positive document.
        pos_score: [B] float, each query's positive score (detached); needed by ``margin``.
        doc_owner: [N] int64, the query owning each document (-1: none).
        doc_key: [N] int64 document ids (equal ids: duplicates).
        pos_key: [B] int64, the key of row i's positive; needs doc_key. Defaults to
            ``doc_key[pos_index]``; given where rows have no pos_index (GTE's document-document
            term), it drops every j with ``doc_key[j] == pos_key[i]``.
        threshold: drop candidates whose raw score exceeds it.
        margin: drop candidates whose raw score exceeds ``margin * pos_score[i]``.
        exclude_diagonal: drop j == i.

    The field names are the custom ops' argument names.

    Example:
        >>> rule = CandidateRule(pos_index=torch.tensor([0, 1]), exclude_diagonal=True)
        >>> rule.keywords()["exclude_diagonal"]
        True
    """

    pos_index: Optional[torch.Tensor] = None
    pos_score: Optional[torch.Tensor] = None
    doc_owner: Optional[torch.Tensor] = None
    doc_key: Optional[torch.Tensor] = None
    pos_key: Optional[torch.Tensor] = None
    threshold: Optional[float] = None
    margin: Optional[float] = None
    exclude_diagonal: bool = False

    def keywords(self) -> dict:
        """The rule as the ops' keyword arguments: ``op(q, d, scale, **rule.keywords())``."""
        return self._asdict()

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, object]) -> CandidateRule:
        """The rule from a function's arguments named like its fields (``locals()`` of a public
        function or custom op whose parameters carry the rule): read by name, never by position."""
        return cls(**{name: arguments[name] for name in cls._fields})

    def tensors(self) -> tuple[Optional[torch.Tensor], ...]:
        """(pos_index, pos_score, doc_owner, doc_key, pos_key): what an autograd Function saves."""
        return self.pos_index, self.pos_score, self.doc_owner, self.doc_key, self.pos_key

    def with_tensors(self, tensors: Sequence[Optional[torch.Tensor]]) -> CandidateRule:
        """The rule with its tensors replaced by ``tensors``, in the order of :meth:`tensors`."""
        pos_index, pos_score, doc_owner, doc_key, pos_key = tensors
        return self._replace(
            pos_index=pos_index, pos_score=pos_score, doc_owner=doc_owner, doc_key=doc_key, pos_key=pos_key
        )

    def canonical(self) -> CandidateRule:
        """threshold and margin as Python floats (the ops' schema), pos_score dropped without
        margin (only margin reads it) and pos_key resolved (:meth:`with_pos_key`)."""
        return self._replace(
            threshold=None if self.threshold is None else float(self.threshold),
            margin=None if self.margin is None else float(self.margin),
            pos_score=self.pos_score if self.margin is not None else None,
        ).with_pos_key()

    def with_pos_key(self) -> CandidateRule:
        """pos_key resolved to ``doc_key[pos_index]`` where doc_key is given without it (the kernels
        read pos_key [B] instead of looking doc_key[pos_index] up per tile). index_select: no host
        sync (an out-of-range index fails on the device, or is caught by validation first)."""
        if self.doc_key is None or self.pos_key is not None:
            return self
        return self._replace(pos_key=self.doc_key.index_select(0, self.pos_index))
