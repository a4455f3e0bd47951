"""InfoNCEOptions: one validated dataclass for the loss's options, shared by infonce_loss and
InfoNCELoss through the core infonce_loss_with_scale."""

import inspect

import pytest
import torch

from latentembed.modules.contrastive import (
    InfoNCELoss,
    InfoNCEOptions,
    infonce_loss,
    infonce_loss_with_scale,
)
from latentembed.modules.contrastive.module import PER_CALL
from latentembed.modules.contrastive.terms import TERMS


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(similarity="l2"), ValueError, "similarity must be 'cos' or 'dot', got 'l2'"),
        (dict(reduction="max"), ValueError, "reduction must be one of"),
        (dict(negatives_order="random"), ValueError, "negatives_order must be one of"),
        (dict(in_batch_negatives=False, query_query=True), ValueError, "in-batch terms"),
        (dict(in_batch_negatives=False, doc_doc=True), ValueError, "in-batch terms"),
    ],
    ids=["similarity", "reduction", "negatives-order", "qq-without-in-batch", "dd-without-in-batch"],
)
def test_options_are_checked_once_for_function_and_module(options, error, match):
    q, d = torch.randn(4, 8), torch.randn(12, 8)
    with pytest.raises(error, match=match):
        InfoNCEOptions(**options)
    with pytest.raises(error, match=match):
        infonce_loss(q, d, **options)
    with pytest.raises(error, match=match):  # at construction now, not at the first forward
        InfoNCELoss(0.05, **options)


@pytest.mark.parametrize(
    "options",
    [
        dict(hard_negatives=None),
        dict(doc_ids=None),
        dict(return_stats=True),
        dict(simmilarity="dot"),
        dict(_scale=None),
    ],
    ids=["per-call", "doc-ids", "return-stats", "misspelt", "private"],
)
def test_module_rejects_per_call_and_unknown_options(options):
    with pytest.raises(TypeError, match="unexpected or per-call options"):
        InfoNCELoss(0.05, **options)


def test_options_and_per_call_keywords_are_infonce_loss_keywords():
    # The dataclass replaces infonce_loss.__kwdefaults__ as the list of options: they must not drift.
    keywords = {
        name
        for name, p in inspect.signature(infonce_loss).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert InfoNCEOptions.names() | set(PER_CALL) == keywords
    assert not InfoNCEOptions.names() & set(PER_CALL)
    defaults = {f: inspect.signature(infonce_loss).parameters[f].default for f in InfoNCEOptions.names()}
    assert InfoNCEOptions(**defaults) == InfoNCEOptions()


def test_core_takes_the_scale_and_the_options():
    q, d = torch.randn(5, 16, dtype=torch.float64), torch.randn(15, 16, dtype=torch.float64)
    options = dict(symmetric=True, query_query=True, doc_doc=True, margin=0.9, mask_duplicates=True)
    expected = infonce_loss(q, d, temperature=0.05, reduction="none", **options)
    got = infonce_loss_with_scale(
        q, d, scale=torch.tensor(20.0, dtype=torch.float64), options=InfoNCEOptions(reduction="none", **options)
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    module = InfoNCELoss(0.05, reduction="none", **options)
    assert module.options == InfoNCEOptions(reduction="none", **options)
    # the module's scale is a float32 exp(log(1 / 0.05)): equal to 20 within float32 rounding
    torch.testing.assert_close(module(q, d), expected, rtol=1e-6, atol=1e-6)


def test_directions_name_the_terms():
    assert InfoNCEOptions().directions == ("query_to_doc",)
    every = InfoNCEOptions(symmetric=True, query_query=True, doc_doc=True).directions
    assert set(every) == set(TERMS) == {"query_to_doc", "query_to_query", "doc_to_doc", "doc_to_query"}
