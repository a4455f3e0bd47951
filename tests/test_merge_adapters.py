"""model.merge_adapters(): one LoRA adapter folded into the weights equals the unmerged model
within float32 rounding, saves as a plain model (no adapters), unmerges; several adapters are
refused (they keep their routing). train --merge-on-save writes the merged model/ and the
adapter's PEFT files (with the dropout it trained with)."""

import json

import pytest
import torch

from latentembed.models.embedding import EmbeddingModel
from latentembed.modules.lora import multi_lora_layers
from latentembed.training.tiny import tiny_model, train_tokenizer
from latentembed.training.trainer import TrainConfig, train
from tests.test_training_run import _slice, _write_jsonl, one_thread  # noqa: F401

TEXTS = ["how do plants make food", "Leaves turn sunlight into sugar.", "a third, longer text about rivers"]


def _trained_like(adapters: list) -> EmbeddingModel:
    model = tiny_model(train_tokenizer(TEXTS + ["query passage"]), num_hidden_layers=2)
    model.add_adapters(adapters, rank=4, alpha=8, dropout=0.1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.2)  # B is zero at init: give the adapters something to add
    return model.eval()


def test_merged_equals_unmerged_within_float32_rounding_and_saves_as_a_plain_model(tmp_path):
    model = _trained_like(["default"])
    before = model.encode(TEXTS)
    weights = {n: layer.weight.clone() for n, layer in multi_lora_layers(model)}
    model.merge_adapters()
    assert model.merged
    merged = model.encode(TEXTS)
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path / "merged")
    meta = json.loads((tmp_path / "merged" / "latentembed.json").read_text())
    assert meta["embedding"]["lora"] is None and meta["extra_state"] == {}
    plain = EmbeddingModel.from_pretrained(tmp_path / "merged")
    assert plain.adapter_names == () and not list(multi_lora_layers(plain))
    torch.testing.assert_close(plain.encode(TEXTS), merged, rtol=0, atol=0)
    model.unmerge_adapters()
    assert not model.merged
    for name, layer in multi_lora_layers(model):
        torch.testing.assert_close(layer.weight, weights[name], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.encode(TEXTS), before, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no adapter is merged"):
        model.unmerge_adapters()


def test_several_adapters_keep_their_routing():
    model = _trained_like(["query", "passage"])
    with pytest.raises(ValueError, match=r"has 2 \(\['query', 'passage'\]\).*keep the routing"):
        model.merge_adapters()
    assert not model.merged
    with pytest.raises(ValueError, match="has 0"):
        tiny_model(train_tokenizer(TEXTS)).merge_adapters()


def test_train_merge_on_save_writes_the_merged_model_and_the_adapter(tmp_path, one_thread):
    data = _write_jsonl(tmp_path / "t.jsonl", _slice("retrieval", 24, 1))
    cfg = TrainConfig(
        data=str(data),
        steps=3,
        batch_size=4,
        max_length=32,
        full=False,
        lora_rank=4,
        lora_dropout=0.05,
        eval=False,
        quiet=True,
        output=str(tmp_path / "out"),
        merge_on_save=True,
    )
    result = train(cfg)
    model = result["model"]
    assert model.merged  # the returned model is the merged one
    saved = EmbeddingModel.from_pretrained(tmp_path / "out" / "model")
    assert saved.adapter_names == ()
    peft = json.loads((tmp_path / "out" / "adapters" / "default" / "adapter_config.json").read_text())
    assert peft["lora_dropout"] == 0.05
    texts = [r.query for r in _slice("retrieval", 4, 2)]
    merged = saved.encode(texts, task="retrieval")
    model.unmerge_adapters()
    torch.testing.assert_close(merged, model.encode(texts, task="retrieval"), rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "out" / "train_config.json").read_text())["merge_on_save"] is True
