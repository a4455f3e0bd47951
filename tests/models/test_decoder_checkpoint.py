"""Checkpoint I/O of the decoder: layouts, prefixes, dtype/device at load, round trips, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentembed.models.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    load_decoder,
    save_decoder,
)

from .decoder_helpers import hf_model, random_batch, rel_err, save_hf

pytest.importorskip("transformers")


def _state(model, prefix=""):
    return {prefix + k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _write(path, state, config):
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / SINGLE_FILE), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture
def saved(tmp_path):
    hf = hf_model("mistral")
    save_hf(hf, tmp_path / "hf")
    return hf, tmp_path


def _same_weights(model, hf):
    hf_state = hf.state_dict()
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, hf_state[name].to(p.dtype), rtol=0, atol=0, msg=name)


def test_sharded_checkpoint_loads(saved):
    hf, tmp = saved
    save_hf(hf, tmp / "sharded", max_shard_size="20KB")
    assert (tmp / "sharded" / INDEX_FILE).is_file()
    model = load_decoder(tmp / "sharded")
    _same_weights(model, hf)
    assert model.checkpoint_format.sharded


@pytest.mark.parametrize("prefix", ["model.", "embedding_model."])
def test_prefixed_checkpoint_loads(saved, prefix):
    hf, tmp = saved
    state = _state(hf, prefix)
    config = hf.config.to_dict()
    if prefix == "model.":
        state["lm_head.weight"] = torch.randn(128, 64)  # a *ForCausalLM checkpoint
    else:
        # NV-Embed-v2: the backbone under embedding_model., the pooling head beside it, and a
        # wrapper config nesting the Mistral config as text_config
        state["latent_attention_model.latents"] = torch.randn(4, 64)
        config = {"model_type": "nvembed", "text_config": dict(config, model_type="bidir_mistral")}
    _write(tmp / "ckpt", state, config)
    model = load_decoder(tmp / "ckpt")
    _same_weights(model, hf)
    fmt = model.checkpoint_format
    assert fmt.prefix == prefix
    assert fmt.skipped_keys == (["lm_head.weight"] if prefix == "model." else ["latent_attention_model.latents"])
    ids, mask = random_batch([5, 3])
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask.long()).last_hidden_state
        out = model(ids, mask, causal=True).last_hidden_state
    assert rel_err(out[mask], ref[mask]) <= 1e-5
    # Saving writes the backbone only (documented): the skipped tensors are not carried along.
    save_decoder(model, tmp / "saved")
    written = set(load_file(str(tmp / "saved" / SINGLE_FILE)))
    assert written == {prefix + k for k in model.state_dict()}
    assert not written & set(fmt.skipped_keys)


@pytest.mark.parametrize("prefix", ["", "embedding_model."])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_save_load_round_trip_exact(saved, prefix, sharded):
    hf, tmp = saved
    _write(tmp / "src", _state(hf, prefix), hf.config.to_dict())
    model = load_decoder(tmp / "src")
    save_decoder(model, tmp / "out", max_shard_bytes=30_000 if sharded else None)
    assert (tmp / "out" / INDEX_FILE).is_file() == sharded
    again = load_decoder(tmp / "out")
    assert again.checkpoint_format.prefix == prefix
    for name, p in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], p), name
    if not sharded:
        assert set(load_file(str(tmp / "out" / SINGLE_FILE))) == set(_state(hf, prefix))
    # saving again keeps the loaded format (prefix and sharding)
    save_decoder(again, tmp / "out2")
    assert (tmp / "out2" / INDEX_FILE).is_file() == sharded
    assert again.config == model.config


def test_dtype_and_device_chosen_at_load(saved):
    hf, tmp = saved
    model = load_decoder(tmp / "hf", dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.rotary_emb.inv_freq.dtype == torch.float32  # rotary frequencies stay fp32
    _same_weights(model, hf)
    assert all(p.requires_grad for p in model.parameters())


def test_bad_checkpoint_lists_every_problem(saved):
    hf, tmp = saved
    state = _state(hf)
    del state["layers.1.mlp.up_proj.weight"]
    del state["norm.weight"]
    state["layers.0.self_attn.k_proj.weight"] = torch.randn(16, 64)
    state["layers.0.self_attn.rotary.extra"] = torch.randn(3)
    _write(tmp / "bad", state, hf.config.to_dict())
    with pytest.raises(CheckpointError) as err:
        load_decoder(tmp / "bad")
    msg = str(err.value)
    assert "2 missing: layers.1.mlp.up_proj.weight; norm.weight" in msg
    assert "1 unexpected: layers.0.self_attn.rotary.extra" in msg
    assert "layers.0.self_attn.k_proj.weight: checkpoint (16, 64), model (32, 64)" in msg
    # strict=False skips what does not fit; tensors still missing on a meta model are an error
    with pytest.raises(CheckpointError, match="lacks 3 tensors"):
        load_decoder(tmp / "bad", strict=False)


def test_unknown_model_type_and_missing_files(saved, tmp_path):
    hf, tmp = saved
    config = hf.config.to_dict()
    config["model_type"] = "gemma2"
    _write(tmp / "gemma", _state(hf), config)
    with pytest.raises(ValueError, match="model_type must be one of \\('mistral', 'llama', 'qwen2'\\), got 'gemma2'"):
        load_decoder(tmp / "gemma")
    (tmp / "empty").mkdir()
    (tmp / "empty" / "config.json").write_text(json.dumps(hf.config.to_dict()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        load_decoder(tmp / "empty")


def test_loads_without_fp32_copy(saved, monkeypatch):
    """A bf16 load of an fp32 file converts each tensor as soon as it is read: at most one
    stored-dtype tensor is alive at any time (no full fp32 state dict on the way)."""
    hf, tmp = saved
    import weakref

    import latentembed.models.checkpoint as ckpt

    read, most_alive = [], [0]
    real_open = ckpt.safe_open

    class Counting:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

        def keys(self):
            return self.f.keys()

        def get_slice(self, key):
            return self.f.get_slice(key)

        def get_tensor(self, key):
            t = self.f.get_tensor(key)
            assert t.dtype == torch.float32
            read.append(weakref.ref(t))
            most_alive[0] = max(most_alive[0], sum(r() is not None for r in read))
            return t

    monkeypatch.setattr(ckpt, "safe_open", Counting)
    model = load_decoder(tmp / "hf", dtype=torch.bfloat16)
    assert len(read) == len(model.state_dict())
    assert most_alive[0] == 1
