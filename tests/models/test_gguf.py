"""GGUF import against transformers' own GGUF loader (an external reference): hidden states of
the decoder and token ids of the tokenizer rebuilt from the metadata, on small files written here
with the ``gguf`` package's writer in every supported tensor type, plus the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentembed import EmbeddingModel
from latentembed.models.checkpoint import load_decoder
from latentembed.models.gguf import GGUFError, open_gguf, read_gguf, unpermute_rotary_rows

from .decoder_helpers import hf_positions, rel_err
from .gguf_helpers import permute_rotary_rows, write_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

# (architecture, general.name, tensor type): every architecture and every supported type once.
CASES = [
    ("llama", "tiny", "Q4_0"),
    ("llama", "tiny", "Q4_1"),
    ("llama", "tiny mistral", "Q8_0"),
    ("qwen2", "tiny", "F16"),
    ("llama", "tiny", "BF16"),
    ("qwen2", "tiny", "F32"),
]
TEXT = "Hello world, the quick brown fox jumps over the lazy dog.\n  Two  spaces; they're embeddings!"


def _hf_model(path):
    return transformers.AutoModel.from_pretrained(str(path.parent), gguf_file=path.name).eval()


def _hf_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("arch,name,qtype", CASES, ids=[f"{a}-{n.split()[-1]}-{q}" for a, n, q in CASES])
def test_hidden_states_match_transformers(tmp_path, arch, name, qtype):
    path = write_gguf(tmp_path / "m.gguf", arch=arch, name=name, qtype=qtype, pre="qwen2", seed=len(qtype))
    hf = _hf_model(path)
    ours = load_decoder(path)
    assert ours.config.model_type == ("mistral" if "mistral" in name else arch)
    assert ours.config.qkv_bias == (arch == "qwen2") and ours.config.tie_word_embeddings
    lengths = [9, 4, 1]
    mask = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    ids = torch.randint(3, ours.config.vocab_size, (3, 9)) * mask
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask.long(), position_ids=hf_positions(mask)).last_hidden_state
        out = ours(ids, mask, causal=True).last_hidden_state
    assert rel_err(out[mask], ref[mask]) <= 1e-5


def test_rotary_rows_unpermuted(tmp_path):
    # F32 stores the values exactly: the loaded q/k must be the rows before llama.cpp's permutation.
    path = write_gguf(tmp_path / "m.gguf", qtype="F32")
    reader = open_gguf(path)
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    model = load_decoder(path)
    q = model.layers[1].self_attn.q_proj.weight.detach().numpy()
    k = model.layers[1].self_attn.k_proj.weight.detach().numpy()
    assert np.array_equal(permute_rotary_rows(q, 4), stored["blk.1.attn_q.weight"])
    assert np.array_equal(permute_rotary_rows(k, 2), stored["blk.1.attn_k.weight"])
    assert not np.array_equal(q, stored["blk.1.attn_q.weight"])  # the permutation is not the identity here
    x = np.random.default_rng(0).standard_normal((6 * 8, 5))
    assert np.array_equal(unpermute_rotary_rows(permute_rotary_rows(x, 6), 6), x)


@pytest.mark.parametrize("pre", ["gpt2", "qwen2", "llama-bpe", "smollm", "spm"])
def test_token_ids_match_transformers(tmp_path, pre):
    path = write_gguf(tmp_path / "m.gguf", pre=pre, spm=pre == "spm")
    ours = read_gguf(path).tokenizer
    theirs = _hf_tokenizer(path)
    # transformers splits smollm files with GPT-2's rule; llama.cpp puts every digit apart
    # (test_smollm_digits_split_one_by_one), so digits are left out of that comparison.
    texts = [TEXT, " leading space", "<|im_start|>user text<|im_end|>", "Ünïcödé façade – naïve"]
    if pre != "smollm":
        texts.append("In 1969, 600 million watched; 12345 digits.")
    for text in texts:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        plain = ours.encode(text, add_special_tokens=False)
        assert ours.decode(plain, skip_special_tokens=False).strip() == text.strip()
    if pre == "spm":
        assert ours.encode("hi")[0] == ours.bos_token_id == 1  # sentencepiece files add BOS by default


def test_smollm_digits_split_one_by_one(tmp_path):
    tok = read_gguf(write_gguf(tmp_path / "m.gguf", pre="smollm")).tokenizer
    pieces = [tok.decode([i]) for i in tok.encode("year 1969")]
    assert pieces[-4:] == ["1", "9", "6", "9"]


def test_from_pretrained_reads_gguf(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", qtype="Q8_0")
    model = EmbeddingModel.from_pretrained(path, pooling="mean")
    assert model.tokenizer.eos_token == "<|im_end|>" and model.tokenizer.pad_token_id == 2
    emb = model.encode(["a first sentence", "a second, longer sentence"])
    assert emb.shape == (2, 64) and torch.isfinite(emb).all()
    with pytest.raises(ValueError, match="choose its pooling"):
        EmbeddingModel.from_pretrained(path)
    model.save_pretrained(tmp_path / "saved")  # an ordinary directory from here on
    again = EmbeddingModel.from_pretrained(tmp_path / "saved")
    assert torch.equal(again.encode(["a first sentence"]), model.encode(["a first sentence"]))


def _cut(path, size):
    data = path.read_bytes()
    path.write_bytes(data[:size])
    return path


def test_truncated_file(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    full = path.stat().st_size
    for size in (full - 100, 200, 10):  # in the tensor data, in the metadata, in the header
        with pytest.raises(GGUFError, match=rf"\({size} bytes\) could not be parsed as GGUF, truncated or corrupt"):
            load_decoder(_cut(path, size))


def test_not_gguf(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"PK\x03\x04not a gguf file")
    with pytest.raises(FileNotFoundError, match="model directory"):  # not GGUF magic: not taken as a model
        EmbeddingModel.from_pretrained(path, pooling="mean")
    with pytest.raises(GGUFError, match=r"is not a GGUF file: it starts with b'PK\\x03\\x04'"):
        open_gguf(path)


def test_unknown_architecture(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", arch="gemma")
    with pytest.raises(GGUFError, match=r"general.architecture 'gemma' is not supported; expected one of"):
        load_decoder(path)


def test_unsupported_quantisation(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", qtype="Q5_0")
    with pytest.raises(GGUFError, match=r"unsupported quantisation types: Q5_0 \(15 tensors, e.g. token_embd"):
        load_decoder(path)


def test_scaled_rope_and_unknown_tensors_refused(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", extra_tensor="rope_freqs.weight")
    with pytest.raises(GGUFError, match="rope_freqs tensor"):
        load_decoder(path)
    path = write_gguf(tmp_path / "b.gguf", extra_tensor="blk.0.attn_q_norm.weight")
    with pytest.raises(GGUFError, match="1 tensors a llama decoder does not have: blk.0.attn_q_norm.weight"):
        load_decoder(path)


def test_unknown_pre_tokenizer_refused(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", pre="made-up")
    with pytest.raises(GGUFError, match="tokenizer.ggml.pre 'made-up' is not known"):
        EmbeddingModel.from_pretrained(path, pooling="mean")
