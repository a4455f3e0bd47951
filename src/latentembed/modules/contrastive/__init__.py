"""InfoNCE contrastive loss for embedding training, scored by the fused ``infonce_lse`` op.

``loss_i = -log( exp(s(q_i, d+_i) / tau) / sum_{j in C(i)} exp(s(q_i, d_j) / tau) )``, where the
candidate set C(i) holds the positive, the in-batch documents (or only the query's own hard
negatives) minus masked false negatives. Every logsumexp goes through
:func:`latentembed.ops.infonce.infonce_lse` (or ``infonce_per_query_loss``), so on a GPU the
[B, N] score matrix is never stored. See :func:`infonce_loss` for the inputs,
:class:`InfoNCEOptions` for the options and :class:`InfoNCELoss` for the module.

Files, as the concepts split:
  options.py     InfoNCEOptions (validated) and the temperature -> scale conversion
  layout.py      the three input layouts, checked and resolved into Candidates / OwnedCandidates
  terms.py       the terms keyed by direction (query_to_doc, query_to_query, doc_to_doc,
                 doc_to_query) and how they combine
  gathering.py   cross-rank gathering of the candidates and their duplicate keys
  owned.py       stage 2 with implied ownership: [B, 1 + k] scores, no [B, N] pass
  duplicates.py  bitwise-duplicate rows (mask_duplicates)
  autograd.py    memory-lean autograd Functions (normalisation, row dots, owned scores, clamp)
  loss.py        infonce_loss and the core infonce_loss_with_scale
  module.py      InfoNCELoss
"""

from .autograd import cosine_normalize
from .duplicates import duplicate_keys
from .loss import InfoNCEOutput, infonce_loss, infonce_loss_with_scale
from .module import InfoNCELoss
from .options import InfoNCEOptions

__all__ = [
    "InfoNCELoss",
    "InfoNCEOptions",
    "InfoNCEOutput",
    "cosine_normalize",
    "duplicate_keys",
    "infonce_loss",
    "infonce_loss_with_scale",
]
