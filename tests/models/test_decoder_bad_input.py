"""Errors a user can act on: the decoder's tensor inputs on the wrong device or of the wrong
type, token ids outside the vocabulary, and config.json files that are not valid JSON or hold
fields of the wrong type. Each message names the argument (or file and field), what was
expected and what came."""

import json
import re

import pytest
import torch

from latentembed.models.decoder_config import DecoderConfig
from latentembed.modules.latent_attention import LatentAttentionPooling
from latentembed.modules.pooling import pool

from .decoder_helpers import pack, random_batch
from .test_decoder_inputs import tiny

VOCAB = 128


@pytest.mark.parametrize(
    "argument",
    [
        "input_ids",
        "inputs_embeds",
        "attention_mask",
        "position_ids",
        "packed input_ids",
        "packed inputs_embeds",
        "cu_seqlens",
        "packed position_ids",
    ],
)
def test_every_tensor_input_must_be_on_the_models_device(argument):
    """A meta tensor stands for any other device: before, meta input_ids came back as
    uninitialised memory and meta position_ids as 'unsupported scalarType'."""
    model = tiny()
    ids, mask = random_batch([4, 3])
    packed_ids, cu = pack(ids, mask)
    if argument.startswith("packed") or argument == "cu_seqlens":
        kw = dict(input_ids=packed_ids, cu_seqlens=cu)
        lead = packed_ids.shape
    else:
        kw = dict(input_ids=ids, attention_mask=mask)
        lead = ids.shape
    name = argument.split()[-1]
    if name == "inputs_embeds":
        kw.pop("input_ids")
        kw["inputs_embeds"] = torch.randn(*lead, 64)
    if name == "position_ids":
        kw["position_ids"] = torch.randint(0, 8, lead)
    kw[name] = kw[name].to("meta")
    msg = rf"^{name} must be on the same device as the model's parameters \(cpu\), got meta$"
    with pytest.raises(ValueError, match=msg):
        model(**kw)


def test_position_ids_shape_and_dtype_are_checked():
    model = tiny()
    ids, mask = random_batch([4, 3])
    with pytest.raises(ValueError, match=r"position_ids must have the shape of input_ids \(2, 4\), got \(1, 4\)"):
        model(ids, mask, position_ids=torch.arange(4)[None])
    with pytest.raises(TypeError, match="position_ids must be an integer tensor, got float32"):
        model(ids, mask, position_ids=torch.rand(2, 4))
    with pytest.raises(TypeError, match="position_ids must be a torch.Tensor, got list"):
        model(ids, mask, position_ids=[[0, 1, 2, 3]] * 2)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 37, -1])
def test_token_ids_outside_the_vocabulary(layout, bad):
    model = tiny()
    ids, mask = random_batch([5, 3])
    if layout == "packed":
        ids, cu = pack(ids, mask)
        ids[int(torch.randint(0, ids.shape[0], ()))] = bad
        kw = dict(cu_seqlens=cu)
    else:
        real = mask.nonzero()
        b, t = real[int(torch.randint(0, real.shape[0], ()))].tolist()
        ids[b, t] = bad
        kw = dict(attention_mask=mask)
    where = tuple((ids == bad).nonzero()[0].tolist())
    msg = f"input_ids must be token ids in [0, {VOCAB}) (vocab_size {VOCAB}), got {bad} at position {where}"
    with pytest.raises(ValueError, match=re.escape(msg)):
        model(ids, **kw)


def test_token_range_check_skipped_with_validate_false():
    """validate=False costs no host read: an in-range batch runs, and the check is off."""
    model = tiny()
    ids, mask = random_batch([5, 3])
    out = model(ids, mask, validate=False).last_hidden_state
    torch.testing.assert_close(out, model(ids, mask).last_hidden_state, rtol=0, atol=0)


def test_cu_seqlens_as_a_list_is_a_type_error_everywhere():
    """The type is checked before the device (a list has no .device: AttributeError before)."""
    model = tiny()
    ids, mask = random_batch([4, 3])
    packed_ids, cu = pack(ids, mask)
    as_list = cu.tolist()
    msg = "cu_seqlens must be a torch.Tensor, got list"
    with pytest.raises(TypeError, match=msg):
        model(packed_ids, cu_seqlens=as_list)
    hidden = torch.randn(packed_ids.shape[0], 24)
    for mode in ("mean", "last", "weighted_mean"):
        with pytest.raises(TypeError, match=msg):
            pool(hidden, mode=mode, cu_seqlens=as_list)
    latent = LatentAttentionPooling(hidden_size=24, num_latents=3, num_heads=2, dim_head=8)
    with pytest.raises(TypeError, match=msg):
        latent(hidden, cu_seqlens=as_list)
    with pytest.raises(TypeError, match=msg):
        pool(hidden, mode="latent_attention", latent_attention=latent, cu_seqlens=as_list)


# -- config.json --------------------------------------------------------------------------

BASE = dict(
    model_type="mistral",
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=10000,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def _write(tmp_path, text: str):
    path = tmp_path / "config.json"
    path.write_text(text)
    return path


def test_invalid_json_names_the_file_and_the_position(tmp_path):
    text = json.dumps(BASE, indent=1).replace('"hidden_size": 32,', '"hidden_size": 32,,')
    path = _write(tmp_path, text)
    line = text[: text.index(",,") + 1].count("\n") + 1
    col = len(text[: text.index(",,") + 1].rsplit("\n", 1)[-1]) + 1
    with pytest.raises(ValueError, match=re.escape(f"{path} is not valid JSON: ") + rf".* line {line} column {col}"):
        DecoderConfig.from_hf_config(tmp_path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(f"{path} must hold a JSON object (a dict of fields), got list")):
        DecoderConfig.from_hf_config(path)


WRONG_TYPES = [
    ("hidden_size", "32", "an integer"),
    ("vocab_size", 128.0, "an integer"),
    ("num_hidden_layers", True, "an integer"),
    ("num_key_value_heads", "2", "an integer"),
    ("head_dim", 8.5, "an integer"),
    ("max_position_embeddings", "64", "an integer"),
    ("sliding_window", "4096", "an integer"),
    ("pad_token_id", "0", "an integer"),
    ("rms_norm_eps", "1e-6", "a number"),
    ("rope_theta", "10000", "a number"),
    ("rope_theta", False, "a number"),
    ("attention_bias", "false", "a boolean"),
    ("mlp_bias", 0, "a boolean"),
    ("tie_word_embeddings", "true", "a boolean"),
]


@pytest.mark.parametrize("field, value, expected", WRONG_TYPES, ids=[f"{f}={v!r}" for f, v, _ in WRONG_TYPES])
def test_wrong_field_type_names_file_field_expected_and_value(tmp_path, field, value, expected):
    path = _write(tmp_path, json.dumps(dict(BASE, **{field: value})))
    msg = f"{path}: {field} must be {expected}, got {value!r} ({type(value).__name__})"
    with pytest.raises(TypeError, match=re.escape(msg)):
        DecoderConfig.from_hf_config(path)


def test_wrong_types_inside_text_config_and_rope_scaling(tmp_path):
    wrapped = dict(model_type="nvembed", text_config=dict(BASE, intermediate_size="48"))
    path = _write(tmp_path, json.dumps(wrapped))
    msg = f"{path}: text_config.intermediate_size must be an integer, got '48' (str)"
    with pytest.raises(TypeError, match=re.escape(msg)):
        DecoderConfig.from_hf_config(path)
    scaled = dict(
        BASE,
        model_type="llama",
        rope_scaling=dict(rope_type="llama3", factor="8.0", low_freq_factor=1.0, high_freq_factor=4.0),
    )
    path = _write(tmp_path, json.dumps(scaled))
    with pytest.raises(TypeError, match=re.escape(f"{path}: rope_scaling.factor must be a number, got '8.0' (str)")):
        DecoderConfig.from_hf_config(path)


def test_dict_source_and_direct_construction_check_types_too():
    with pytest.raises(TypeError, match=re.escape("config dict: hidden_size must be an integer, got '32' (str)")):
        DecoderConfig.from_hf_config(dict(BASE, hidden_size="32"))
    with pytest.raises(TypeError, match=re.escape("num_attention_heads must be an integer, got 4.0 (float)")):
        DecoderConfig(vocab_size=8, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4.0)
    with pytest.raises(TypeError, match=re.escape("qkv_bias must be a boolean, got 'no' (str)")):
        DecoderConfig(
            vocab_size=8, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4, qkv_bias="no"
        )


def test_valid_numbers_still_load(tmp_path):
    """Integers are fine where floats are expected (rope_theta: 10000 is common), nulls where
    a field is optional."""
    path = _write(
        tmp_path,
        json.dumps(
            dict(BASE, rope_theta=500000, rms_norm_eps=1e-5, sliding_window=None, head_dim=None, pad_token_id=None)
        ),
    )
    cfg = DecoderConfig.from_hf_config(path)
    assert cfg.rope_theta == 500000.0 and isinstance(cfg.rope_theta, float)
    assert cfg.hidden_size == 32 and cfg.head_dim == 8 and cfg.sliding_window is None


def test_bad_values_name_the_file(tmp_path):
    path = _write(tmp_path, json.dumps(dict(BASE, rope_theta=0)))
    msg = f"{path}: rms_norm_eps and rope_theta must be > 0, got 1e-06 and 0.0"
    with pytest.raises(ValueError, match=re.escape(msg)):
        DecoderConfig.from_hf_config(path)
    path = _write(tmp_path, json.dumps(dict(BASE, num_attention_heads=0)))
    with pytest.raises(ValueError, match=re.escape(f"{path}: num_attention_heads must be a positive integer, got 0")):
        DecoderConfig.from_hf_config(path)
    path = _write(tmp_path, json.dumps(dict(BASE, rms_norm_eps=None)))
    with pytest.raises(TypeError, match=re.escape(f"{path}: rms_norm_eps must be a number, got None (NoneType)")):
        DecoderConfig.from_hf_config(path)
