"""EmbeddingModel end to end on CPU: checkpoints in every format, encode(), adapters, errors.

External references: transformers' MistralModel / Qwen2Model (bidirectional through a 4-D
mask), the public latent-attention block (UnfoldedLatentAttentionPooling), PEFT's LoRA model,
and transformers' tokenizers applying NV-Embed's own input recipe.
"""

import json

import numpy as np
import pytest
import torch

from latentembed.models.checkpoint import CheckpointError
from latentembed.models.embedding import EmbeddingModel
from tests.tokenizer_helpers import VOCAB_SIZE

from .decoder_helpers import bidirectional_mask_4d, hf_positions, rel_err
from .embedding_helpers import QUERY_INSTRUCTION, nvembed_dir, plain_decoder_dir, tiny_model

transformers = pytest.importorskip("transformers")

TEXTS = [
    "how do I bake bread?",
    "Bread is made from flour, water, salt and yeast.",
    "",
    "a man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog. Hello world, hello embeddings! " * 3,
    "hello",
    "Tokenizers split text into tokens.",
]


def hf_reference_embeddings(backbone, tok, texts, prefix, pool, n_masked=0):
    """What NV-Embed / LLM2Vec-style code computes: prefix + text + EOS string, right padding,
    the first ``n_masked`` positions dropped from pooling, a bidirectional transformers model."""
    batch = tok([prefix + t + tok.eos_token for t in texts], padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        hidden = backbone(
            batch["input_ids"], attention_mask=bidirectional_mask_4d(mask), position_ids=hf_positions(mask)
        ).last_hidden_state
    pool_mask = mask.clone()
    pool_mask[:, :n_masked] = False
    return pool(hidden, pool_mask)


# -- latentembed's own format --------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "latent_attention", "last"])
def test_save_load_round_trip_is_exact(tmp_path, pooling):
    model = tiny_model(pooling, adapters=["query", "passage"], prompt_template="nvembed", max_length=40)
    model.save_pretrained(tmp_path)
    loaded = EmbeddingModel.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    theirs, ours = model.state_dict(), loaded.state_dict()
    assert theirs.keys() == ours.keys()
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, ours[key]), key
        else:
            assert value == ours[key], key
    for task in (None, "retrieval", "query", "passage"):  # base, a template task, each adapter
        assert torch.equal(model.encode(TEXTS, task=task), loaded.encode(TEXTS, task=task))
    assert not torch.equal(model.encode(TEXTS, task="query"), model.encode(TEXTS, task="passage"))
    assert loaded.tokenize_texts(TEXTS).input_ids == model.tokenize_texts(TEXTS).input_ids


def test_from_pretrained_builds_the_class_it_is_called_on(tmp_path):
    """embedding_io builds the class handed to it (it never imports EmbeddingModel): a subclass
    loads as itself, in every format."""

    class Subclass(EmbeddingModel):
        pass

    tiny_model("mean").save_pretrained(tmp_path / "own")
    path, _, _ = nvembed_dir(tmp_path / "nv")
    for directory in (tmp_path / "own", path):
        assert type(Subclass.from_pretrained(directory)) is Subclass
        assert type(EmbeddingModel.from_pretrained(directory)) is EmbeddingModel


def test_save_adapters_writes_peft_directories_that_load_back(tmp_path):
    model = tiny_model("mean", adapters=["query", "passage"])
    paths = model.save_adapters(tmp_path / "adapters")
    assert [p.name for p in paths] == ["query", "passage"]
    model.save_pretrained(tmp_path / "base")  # the same model; its adapters then get overwritten
    fresh = EmbeddingModel.from_pretrained(
        tmp_path / "base", adapters={n: tmp_path / "adapters" / n for n in ("query", "passage")}
    )
    for task in ("query", "passage"):
        ids, mask = torch.randint(0, VOCAB_SIZE, (3, 8)), torch.ones(3, 8, dtype=torch.bool)
        assert rel_err(fresh(ids, mask, tasks=task), model(ids, mask, tasks=task)) <= 1e-6


# -- NV-Embed-v2 style ---------------------------------------------------------------------------


def test_nvembed_checkpoint_matches_the_public_recipe(tmp_path):
    path, backbone, head = nvembed_dir(tmp_path)
    model = EmbeddingModel.from_pretrained(path).eval()
    assert (model.config.pooling, model.config.mask_instruction) == ("latent_attention", "nvembed_compat")
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    prefix = f"Instruct: {QUERY_INSTRUCTION}\nQuery: "
    n = len(tok.tokenize(prefix))  # NV-Embed's count: the instruction alone, no BOS
    queries, docs = TEXTS[:2] + TEXTS[3:], TEXTS
    ref_q = hf_reference_embeddings(backbone, tok, queries, prefix, head, n_masked=n)
    ref_d = hf_reference_embeddings(backbone, tok, docs, "", head)
    assert rel_err(model.encode(queries, instruction=QUERY_INSTRUCTION), ref_q) <= 1e-5
    assert rel_err(model.encode(docs), ref_d) <= 1e-5
    # the test can fail: the exact instruction mask pools one token fewer than NV-Embed
    exact = EmbeddingModel.from_pretrained(path, mask_instruction="exact").eval()
    assert rel_err(exact.encode(queries, instruction=QUERY_INSTRUCTION), ref_q) > 1e-4


# -- plain decoders, PEFT adapters --------------------------------------------------------------


@pytest.mark.parametrize("family,tokenizer", [("mistral", "metaspace"), ("qwen2", "bpe"), ("llama", "wordpiece")])
def test_plain_decoder_last_token_pooling_matches_transformers(tmp_path, family, tokenizer):
    plain_decoder_dir(tmp_path, family, tokenizer)
    with pytest.raises(ValueError, match="pooling="):
        EmbeddingModel.from_pretrained(tmp_path)
    model = EmbeddingModel.from_pretrained(tmp_path, pooling="last").eval()
    hf = getattr(transformers, {"mistral": "MistralModel", "qwen2": "Qwen2Model", "llama": "LlamaModel"}[family])
    backbone = hf.from_pretrained(str(tmp_path)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    texts = [t for t in TEXTS if t]

    def last(hidden, mask):
        h = hidden[torch.arange(hidden.shape[0]), mask.long().sum(1) - 1]
        return torch.nn.functional.normalize(h, dim=-1)

    eos = "" if tokenizer == "wordpiece" else None  # wordpiece already ends with [SEP] = its EOS
    if eos is None:
        ref = hf_reference_embeddings(backbone, tok, texts, "", last)
    else:
        batch = tok(texts, padding=True, return_tensors="pt")
        mask = batch["attention_mask"].bool()
        with torch.no_grad():
            hidden = backbone(
                batch["input_ids"], attention_mask=bidirectional_mask_4d(mask), position_ids=hf_positions(mask)
            ).last_hidden_state
        ref = last(hidden, mask)
    assert rel_err(model.encode(texts), ref) <= 1e-5


def test_peft_adapter_directory_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    plain_decoder_dir(tmp_path / "base")
    backbone = transformers.MistralModel.from_pretrained(str(tmp_path / "base")).eval()
    peft_model = peft.get_peft_model(
        backbone, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    model = EmbeddingModel.from_pretrained(
        tmp_path / "base", pooling="mean", adapters={"query": tmp_path / "adapter"}
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "base"))

    def mean(hidden, mask):
        m = mask.unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)

    ref = hf_reference_embeddings(peft_model.eval(), tok, TEXTS, "", mean)
    assert rel_err(model.encode(TEXTS), ref) <= 1e-5
    with peft_model.disable_adapter():  # the test can fail: the adapter changes the embeddings
        base = hf_reference_embeddings(peft_model, tok, TEXTS, "", mean)
    assert rel_err(model.encode(TEXTS), base) > 1e-3


# -- forward and encode ----------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "last", "weighted_mean", "latent_attention"])
def test_packed_equals_padded(pooling):
    model = tiny_model(pooling)
    batch, _, _ = model.tokenize(TEXTS, instruction="find the answer")
    packed = model.embed_batch(batch, packed=True)
    padded = model.embed_batch(batch, packed=False)
    assert rel_err(packed, padded) <= 1e-5


@pytest.mark.parametrize("pooling", ["mean", "latent_attention"])
def test_encode_order_and_batching_invariance(pooling):
    model = tiny_model(pooling, adapters=["query"])
    texts = TEXTS * 2
    one_by_one = torch.stack([model.encode(t) for t in texts])
    for batch_size in (1, 3, 64):
        assert rel_err(model.encode(texts, batch_size=batch_size), one_by_one) <= 1e-5
    assert model.encode(texts[0]).shape == (64,)
    out = model.encode(texts, convert_to="numpy")
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (len(texts), 64)
    assert torch.allclose(torch.linalg.vector_norm(one_by_one, dim=-1), torch.ones(len(texts)), atol=1e-5)
    raw = model.encode(texts, normalize=False)
    assert not torch.allclose(torch.linalg.vector_norm(raw, dim=-1), torch.ones(len(texts)), atol=1e-3)
    assert rel_err(torch.nn.functional.normalize(raw, dim=-1), one_by_one) <= 1e-5


def test_per_sample_tasks_route_adapters():
    model = tiny_model("mean", adapters=["query", "passage"])
    ids, mask = torch.randint(0, VOCAB_SIZE, (4, 9)), torch.ones(4, 9, dtype=torch.bool)
    mask[2, 5:] = False
    tasks = ["query", "passage", "base", "query"]
    mixed = model(ids, mask, tasks=tasks)
    for i, task in enumerate(tasks):
        alone = model(ids[i : i + 1], mask[i : i + 1], tasks=task)
        assert rel_err(mixed[i : i + 1], alone) <= 1e-5
    assert rel_err(model(ids, mask, tasks="query"), model(ids, mask, tasks="passage")) > 1e-3
    # the same mixed routing on packed input
    cu = torch.zeros(5, dtype=torch.int32)
    cu[1:] = mask.sum(1).cumsum(0)
    assert rel_err(model(ids[mask], cu_seqlens=cu, tasks=tasks), mixed) <= 1e-5


def test_encode_keeps_the_training_mode_and_returns_autograd_usable_tensors():
    model = tiny_model("latent_attention").train()
    target = model.encode(TEXTS)
    assert model.training
    assert model.encode([]).shape == (0, 64)
    batch, _, _ = model.tokenize(TEXTS)
    loss = (model.embed_batch(batch) - target).square().sum()  # encode's output as a fixed target
    loss.backward()
    assert model.pooling.latent_attention.latents.grad is not None


@pytest.mark.parametrize("fmt", ["own", "nvembed"])
def test_from_pretrained_in_bfloat16(tmp_path, fmt):
    if fmt == "own":
        tiny_model("latent_attention", adapters=["q"]).save_pretrained(tmp_path)
    else:
        nvembed_dir(tmp_path)
    model = EmbeddingModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    fp32 = EmbeddingModel.from_pretrained(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = model.encode(TEXTS)
    assert out.dtype == torch.float32
    # bf16 keeps about 2-3 significant digits through two layers and the head
    assert rel_err(out, fp32.encode(TEXTS)) <= 0.1


def test_encode_reports_truncation_and_progress(capsys):
    model = tiny_model("last")
    with pytest.warns(UserWarning, match=r"1 of 3 texts .* max_length=12"):
        out = model.encode(["short", TEXTS[4], "hello"], max_length=12, show_progress=True)
    assert "encode: 3/3" in capsys.readouterr().err
    assert torch.isfinite(out).all()


def test_encode_errors():
    model = tiny_model("mean", prompt_template="nvembed")
    with pytest.raises(ValueError, match="retrieval"):  # the message lists the known tasks
        model.encode(["x"], task="no-such-task")
    with pytest.raises(ValueError, match="convert_to"):
        model.encode(["x"], convert_to="list")
    with pytest.raises(ValueError, match="batch_size"):
        model.encode(["x"], batch_size=0)
    model.tokenizer = None
    with pytest.raises(ValueError, match="no tokenizer"):
        model.encode(["x"])
    with pytest.raises(ValueError, match="no adapters"):
        model(torch.zeros(1, 3, dtype=torch.long), tasks="query")
    with pytest.raises(ValueError, match="max_length"):
        tiny_model("mean").encode(["x"], max_length=0)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EmbeddingModel.from_pretrained(tmp_path / "nowhere")
    model = tiny_model("mean")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="pooling='last' does not match"):
        EmbeddingModel.from_pretrained(tmp_path / "m", pooling="last")
    with pytest.raises(TypeError, match="unexpected arguments \\['polling'\\]"):
        EmbeddingModel.from_pretrained(tmp_path / "m", polling="last")
    meta = json.loads((tmp_path / "m" / "latentembed.json").read_text())
    meta["embedding"]["poolng"] = "mean"
    (tmp_path / "m" / "latentembed.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown keys \\['poolng'\\]"):
        EmbeddingModel.from_pretrained(tmp_path / "m")
    latent = tiny_model("latent_attention")
    latent.save_pretrained(tmp_path / "lat")
    meta = json.loads((tmp_path / "lat" / "latentembed.json").read_text())
    meta["embedding"]["latent_attention"]["num_latents"] += 1
    (tmp_path / "lat" / "latentembed.json").write_text(json.dumps(meta))
    with pytest.raises(
        CheckpointError,
        match=r"1 wrong shape: pooling\.latent_attention\.latents: checkpoint \(6, 64\), "
        r"model \(7, 64\)",
    ):
        EmbeddingModel.from_pretrained(tmp_path / "lat")
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        EmbeddingModel.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="latent_attention= describes a new head"):
        EmbeddingModel.from_pretrained(tmp_path / "m", latent_attention={"num_latents": 4})
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        EmbeddingModel.from_pretrained(plain_decoder_dir(tmp_path / "p"), pooling="mean", adapters={"q": tmp_path})
