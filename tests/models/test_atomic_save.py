"""Saves replace a directory whole (no stale file of an earlier save survives, no user file is
deleted), and loading a damaged or mismatched directory names the file, the key or the sizes.

The SIGKILL trials of the same saves are in test_save_sigkill.py.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from latentembed.models.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError, load_decoder, save_decoder
from latentembed.models.decoder import DecoderModel
from latentembed.models.decoder_config import DecoderConfig
from latentembed.models.embedding import EmbeddingModel
from latentembed.models.embedding_config import EmbeddingConfig
from latentembed.tokenization import TextTokenizer
from tests.tokenizer_helpers import raw_tokenizer


def _decoder(vocab=160, **overrides) -> DecoderModel:
    cfg = DecoderConfig(
        vocab_size=vocab,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **overrides,
    )
    model = DecoderModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def _tokenizer() -> TextTokenizer:
    return TextTokenizer(raw_tokenizer("wordpiece"), bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]")


def _id_bound(tok: TextTokenizer) -> int:
    """Largest token id + 1 (the wordpiece vocabulary has a gap: more than its vocab_size)."""
    return max(tok.tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def _embedding_model(vocab=None, tokenizer=True, **config) -> EmbeddingModel:
    tok = _tokenizer() if tokenizer else None
    vocab = vocab or (_id_bound(tok) if tok else 163)
    cfg = DecoderConfig(
        vocab_size=vocab,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = EmbeddingModel(cfg, EmbeddingConfig(**config), tokenizer=tok)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, sb[key]), key


# -- no stale file survives a save ------------------------------------------------------------------


def test_save_decoder_to_one_file_over_a_sharded_save_loads_the_new_weights(tmp_path):
    old, new = _decoder(), _decoder()
    save_decoder(old, tmp_path / "m", max_shard_bytes=20_000)
    assert (tmp_path / "m" / INDEX_FILE).is_file()
    save_decoder(new, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", SINGLE_FILE]
    _assert_same_weights(load_decoder(tmp_path / "m"), new)
    # and back: the single file of the first save does not survive a sharded one
    save_decoder(old, tmp_path / "m", max_shard_bytes=20_000)
    assert not (tmp_path / "m" / SINGLE_FILE).exists()
    _assert_same_weights(load_decoder(tmp_path / "m"), old)


def test_a_directory_with_both_an_index_and_a_single_file_is_refused(tmp_path):
    # What the save of an earlier version left: which file is current cannot be told.
    save_decoder(_decoder(), tmp_path / "m", max_shard_bytes=20_000)
    save_decoder(_decoder(), tmp_path / "one")
    (tmp_path / "one" / SINGLE_FILE).rename(tmp_path / "m" / SINGLE_FILE)
    with pytest.raises(CheckpointError, match=f"both {SINGLE_FILE} and {INDEX_FILE}"):
        load_decoder(tmp_path / "m")


def test_save_pretrained_without_tokenizer_drops_the_old_tokenizer(tmp_path):
    save_with = _embedding_model()
    save_with.save_pretrained(tmp_path / "m")
    assert EmbeddingModel.from_pretrained(tmp_path / "m").tokenizer is not None
    without = _embedding_model(vocab=save_with.backbone.config.vocab_size, tokenizer=False, normalize=False)
    without.save_pretrained(tmp_path / "m")
    loaded = EmbeddingModel.from_pretrained(tmp_path / "m")
    assert loaded.tokenizer is None and not (tmp_path / "m" / "tokenizer.json").exists()
    assert loaded.config == without.config
    _assert_same_weights(loaded, without)


def test_save_adapters_drops_the_adapters_of_an_earlier_save(tmp_path):
    first = _embedding_model()
    first.add_adapters(["query", "passage"], rank=2)
    first.save_adapters(tmp_path / "adapters")
    second = _embedding_model()
    second.add_adapters(["doc"], rank=2)
    with torch.no_grad():
        for name, p in second.named_parameters():
            if ".lora_" in name:
                p.normal_()
    second.save_adapters(tmp_path / "adapters")
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["doc"]
    tensors = load_file(str(tmp_path / "adapters" / "doc" / "adapter_model.safetensors"))
    assert tensors and all(t.abs().sum() > 0 for t in tensors.values())


def test_saves_leave_no_temporary_sibling(tmp_path):
    model = _embedding_model()
    for _ in range(2):
        model.save_pretrained(tmp_path / "m")
        save_decoder(model.backbone, tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "m"]


def test_a_save_does_not_delete_a_users_files(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    model = _embedding_model()
    with pytest.raises(FileExistsError, match="notes.txt"):
        model.save_pretrained(tmp_path / "m")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save_decoder(model.backbone, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# -- load-time errors name the file, the key or the sizes -----------------------------------------


def test_invalid_json_in_latentembed_json_names_the_file(tmp_path):
    _embedding_model().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "latentembed.json").write_text('{"format": "latentembed", "version": 1,')
    with pytest.raises(ValueError, match=r"latentembed\.json.*not valid JSON.*line 1"):
        EmbeddingModel.from_pretrained(tmp_path / "m")


def test_latentembed_json_without_a_key_names_the_file_and_the_key(tmp_path):
    _embedding_model().save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "latentembed.json").read_text())
    del meta["embedding"]
    (tmp_path / "m" / "latentembed.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"latentembed\.json.*lacks the key 'embedding'"):
        EmbeddingModel.from_pretrained(tmp_path / "m")


def test_invalid_index_json_names_the_file(tmp_path):
    save_decoder(_decoder(), tmp_path / "m", max_shard_bytes=20_000)
    (tmp_path / "m" / INDEX_FILE).write_text('{"weight_map": {')
    with pytest.raises(CheckpointError, match=rf"{INDEX_FILE}.*not valid JSON"):
        load_decoder(tmp_path / "m")
    (tmp_path / "m" / INDEX_FILE).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=rf"{INDEX_FILE}.*'weight_map'"):
        load_decoder(tmp_path / "m")


def test_index_naming_a_missing_shard_names_it(tmp_path):
    save_decoder(_decoder(), tmp_path / "m", max_shard_bytes=20_000)
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{INDEX_FILE}.*{shard.name}"):
        load_decoder(tmp_path / "m")


def test_corrupt_tokenizer_json_names_the_file(tmp_path):
    _embedding_model().save_pretrained(tmp_path / "m")
    text = (tmp_path / "m" / "tokenizer.json").read_text()
    (tmp_path / "m" / "tokenizer.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        TextTokenizer.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        EmbeddingModel.from_pretrained(tmp_path / "m")


def test_invalid_tokenizer_config_names_the_file(tmp_path):
    _embedding_model().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "tokenizer_config.json").write_text("{'bos_token': '[CLS]'}")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json.*not valid JSON"):
        TextTokenizer.from_pretrained(tmp_path / "m")


def test_a_tokenizer_larger_than_the_embedding_table_is_refused_at_load(tmp_path):
    tok = _tokenizer()
    n = _id_bound(tok)
    small = _embedding_model(vocab=n - 3, tokenizer=False)
    small.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match=rf"{n} ids.*{n - 3} rows"):
        EmbeddingModel.from_pretrained(tmp_path / "m", tokenizer=tmp_path / "tok")
    with pytest.raises(ValueError, match=rf"{n} ids.*{n - 3} rows"):
        EmbeddingModel.from_pretrained(tmp_path / "m", tokenizer=tok)
    tok.save_pretrained(tmp_path / "m")  # the directory's own tokenizer.json
    with pytest.raises(ValueError, match=rf"tokenizer\.json.*{n} ids.*{n - 3} rows"):
        EmbeddingModel.from_pretrained(tmp_path / "m")


def test_a_tokenizer_larger_than_the_embedding_table_is_refused_when_attached():
    tok = _tokenizer()
    n = _id_bound(tok)
    small = _embedding_model(vocab=n - 3, tokenizer=False)
    with pytest.raises(ValueError, match=rf"{n} ids.*{n - 3} rows"):
        small.tokenizer = tok
    assert small.tokenizer is None
    with pytest.raises(ValueError, match=rf"{n} ids.*{n - 3} rows"):
        EmbeddingModel(small.backbone.config, small.config, tokenizer=tok)


def test_a_tokenizer_smaller_than_the_embedding_table_loads(tmp_path):
    # Padded vocabularies (Mistral: 32768 rows for 32000 tokens) are normal.
    padded = _embedding_model(vocab=_id_bound(_tokenizer()) + 37)
    padded.save_pretrained(tmp_path / "m")
    loaded = EmbeddingModel.from_pretrained(tmp_path / "m")
    assert _id_bound(loaded.tokenizer) < loaded.backbone.config.vocab_size
    assert torch.equal(loaded.encode(["a test"]), padded.encode(["a test"]))


def test_a_directory_missing_after_an_interrupted_save_names_its_previous_version(tmp_path):
    # Without renameat2's exchange a save renames the old directory away first; a kill before
    # the new one is renamed in leaves only .<name>.old-<host>-<pid>-<rand>.
    from latentembed import atomic_io

    _embedding_model().save_pretrained(tmp_path / "m")
    old = tmp_path / f".m.old-{atomic_io._HOST}-999999999-0123abcd"
    (tmp_path / "m").rename(old)
    with pytest.raises(FileNotFoundError, match=r"\.m\.old-.*rename it to m"):
        EmbeddingModel.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match=r"\.m\.old-.*rename it to m"):
        load_decoder(tmp_path / "m")
