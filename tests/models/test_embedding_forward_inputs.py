"""EmbeddingModel.forward takes the pool mask by pool()'s rule, checked before any compute."""

import pytest
import torch

from latentembed.modules.pooling import pool
from tests.tokenizer_helpers import VOCAB_SIZE

from .decoder_helpers import rel_err
from .test_embedding_model import tiny_model

pytest.importorskip("transformers")


def padded_and_packed(B=3, L=7):
    ids = torch.randint(0, VOCAB_SIZE, (B, L))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 4:] = False
    pool_mask = mask & (torch.rand(B, L) < 0.7)
    pool_mask[:, 0] = True  # every sequence pools something
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = mask.sum(1).cumsum(0)
    return ids, mask, pool_mask, cu


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_float_pool_mask_is_refused_like_pool_and_before_the_backbone(layout, dtype):
    model = tiny_model("mean")
    ids, mask, pool_mask, cu = padded_and_packed()
    calls = []
    model.backbone.register_forward_pre_hook(lambda *_: calls.append(1))
    if layout == "padded":
        args, kwargs, hidden = (ids, mask), {}, torch.randn(*ids.shape, 64)
        float_mask = pool_mask.to(dtype)
    else:
        args, kwargs, hidden = (ids[mask],), dict(cu_seqlens=cu), torch.randn(int(mask.sum()), 64)
        float_mask = pool_mask[mask].to(dtype)
    with pytest.raises(TypeError) as from_pool:
        pool(hidden, float_mask, cu_seqlens=kwargs.get("cu_seqlens"))
    with pytest.raises(TypeError) as from_model:
        model(*args, pool_mask=float_mask, **kwargs)
    assert str(from_model.value) == str(from_pool.value)
    assert "pool_mask" in str(from_model.value) and "bool()" in str(from_model.value)
    assert not calls, "the backbone ran before the pool mask was checked"


def test_pool_mask_shape_is_checked_before_the_backbone():
    model = tiny_model("mean")
    ids, mask, pool_mask, _ = padded_and_packed()
    calls = []
    model.backbone.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=r"pool_mask shape \(3, 6\)"):
        model(ids, mask, pool_mask=pool_mask[:, :6])
    assert not calls


def test_integer_pool_mask_pools_like_the_bool_one():
    model = tiny_model("mean")
    ids, mask, pool_mask, cu = padded_and_packed()
    by_bool = model(ids, mask, pool_mask=pool_mask)
    assert rel_err(model(ids, mask, pool_mask=pool_mask.int() * 3), by_bool) <= 1e-6
    assert rel_err(model(ids[mask], cu_seqlens=cu, pool_mask=pool_mask[mask].long()), by_bool) <= 1e-5
    assert rel_err(by_bool, model(ids, mask)) > 1e-4  # the pool mask mattered


def test_cu_seqlens_as_a_list_is_a_type_error_with_one_task_name():
    model = tiny_model("mean", adapters=["query"])
    ids = torch.randint(0, VOCAB_SIZE, (7,))
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor, got list"):
        model(ids, cu_seqlens=[0, 3, 7], tasks="query")
