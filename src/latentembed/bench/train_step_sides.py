"""The two sides of the ``train_step`` benchmark (:mod:`latentembed.bench.train_step`): the
workload, latentembed's step and encode, sentence-transformers + PEFT's, and a tiny random
model for runs without a model directory. Each side's builder runs inside a worker process
and returns ``(step, encode)``: ``step()`` runs one optimizer step and returns (real tokens,
positions computed); ``encode(texts)`` embeds texts and returns the same two counts (its real
tokens from a second tokenization inside the timed call, on both sides: 0.07 s of a 56 s encode
of the 284 documents on SmolLM2)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TEMPERATURE = 0.02


# -- the workload ------------------------------------------------------------------------------


def workload(batch: int = 8, offset: int = 0) -> tuple[list[str], list[str], list[str]]:
    """(queries, positives, hard negatives) of ``batch`` rows of the bundled retrieval set.

    Documents are lengthened with the next rows' positives (3 to 5 of them, by row): most
    reach ``max_length`` = 128 tokens and some stop short, as Wikipedia paragraphs do (the
    issue's workload: 2,004 real tokens of 24 x 128 positions)."""
    from ..training.data import bundled_examples

    rows = bundled_examples("retrieval")
    n = len(rows)

    def longer(text: str, i: int, extra: int) -> str:
        return " ".join([text] + [rows[(i + j) % n].positive for j in range(1, extra + 1)])

    picked = [(offset + i) % n for i in range(batch)]
    queries = [rows[i].query for i in picked]
    positives = [longer(rows[i].positive, i, 3 + i % 3) for i in picked]
    negatives = [longer(rows[i].negatives[0], i + 7, 3 + (i + 1) % 3) for i in picked]
    return queries, positives, negatives


def encode_texts(count: int = 284) -> list[str]:
    """``count`` passages for the encode comparison (the workload's documents, row after row)."""
    texts: list[str] = []
    offset = 0
    while len(texts) < count:
        _, pos, neg = workload(8, offset)
        texts += pos + neg
        offset += 8
    return texts[:count]


# -- the two sides (run inside a worker process) -----------------------------------------------


class PositionCounter:
    """Adds up the positions an embedding layer embeds (a forward hook on it): what the
    backbone computes, padding included (a packed forward embeds the real tokens only)."""

    def __init__(self, embedding: torch.nn.Module):
        self.total = 0
        embedding.register_forward_hook(self._count)

    def _count(self, _module, args, _output) -> None:
        self.total += args[0].numel()


def optimizer_step(forward_loss, optimizer: torch.optim.Optimizer, params: list):
    """``step()`` of one side: ``forward_loss()`` -> (loss, real tokens, positions), then the
    backward, gradients clipped to norm 1 and the optimizer step; returns (real tokens,
    positions). The same for both sides, so only their forwards differ."""

    def step() -> tuple[int, int]:
        loss, real, positions = forward_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return real, positions

    return step


#: latentembed variants of the ablation (``--ablation``), each undoing one of the step's savings.
VARIANTS = {
    "default": "as shipped: packed input, seeded LoRA dropout",
    "padded": "queries and documents as one padded [3B, L] forward (the trainer before issue 19)",
    "stored-dropout": "LoRA dropout as F.dropout on the adapter input (mask and dropped copy stored)",
    "no-dropout": "LoRA dropout 0 (what dropout costs at all)",
}


def _store_dropout_masks() -> None:
    """Patch this worker's LoRA layers to apply dropout as ``F.dropout`` before the op (PEFT's
    and the pre-issue-19 way: autograd keeps the mask and the dropped input per layer)."""
    from ..modules import lora
    from ..ops.multi_lora import multi_lora_linear_add

    def stored(base_out, x, lora_a, lora_b, scaling, grouping, *, p, seed, backend):
        x = torch.nn.functional.dropout(x, p, training=True)
        return multi_lora_linear_add(base_out, x, lora_a, lora_b, scaling, grouping, backend=backend, validate=False)

    lora.multi_lora_add_with_dropout = stored


def latentembed_side(spec: dict, *, with_loss: bool = False):
    """(step, encode) of latentembed in this process; with ``with_loss``, also ``forward_loss()``
    -> (loss, real tokens, positions) of one forward (for scripts/step_memory_breakdown.py)."""
    from ..models.embedding import EmbeddingModel
    from ..modules.contrastive import InfoNCELoss
    from ..tokenization import pack_sequences, tokenize_with_prompts

    device = torch.device(spec["device"])
    variant = spec.get("variant", "default")
    if variant == "stored-dropout":
        _store_dropout_masks()
    dropout = 0.0 if variant == "no-dropout" else spec["dropout"]
    packed = False if variant == "padded" else None
    model = EmbeddingModel.from_pretrained(
        spec["model"], pooling="mean", causal=spec["causal"], add_eos=False, device=device
    )
    model.add_adapters(["default"], rank=16, alpha=32.0, dropout=dropout, target_modules=list(LORA_TARGETS))
    if variant == "padded":  # the decoder would otherwise unpad padded input itself
        model.backbone.forward = functools.partial(type(model.backbone).forward, model.backbone, unpad=False)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    if spec["checkpointing"]:
        model.backbone.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    loss_fn = InfoNCELoss(TEMPERATURE)
    queries, positives, negatives = workload(spec["batch"])
    texts = queries + positives + negatives
    B = len(queries)
    model.train()

    def forward_loss() -> tuple[torch.Tensor, int, int]:
        """(loss, real tokens, positions computed) of one forward."""
        tokenized = tokenize_with_prompts(
            model.tokenizer, texts, "", max_length=spec["max_length"], add_eos=False, mask_instruction="none"
        )
        batch = pack_sequences(tokenized.input_ids, tokenized.pool_mask).to(device)
        args, kwargs = model.batch_inputs(batch, packed=packed)
        emb = model(*args, **kwargs, tasks=["default"] * len(texts)).float()
        loss = loss_fn(emb[:B], emb[B : 2 * B], hard_negatives=emb[2 * B :].view(B, 1, -1))
        return loss, batch.num_tokens, args[0].numel()

    step = optimizer_step(forward_loss, optimizer, params)
    embedded = PositionCounter(model.backbone.embed_tokens)

    def encode(texts_: list[str]) -> tuple[int, int]:
        """Embed ``texts_``; returns (real tokens, positions computed)."""
        before = embedded.total
        model.encode(texts_, batch_size=32, max_length=spec["max_length"])
        real = sum(len(ids) for ids in model.tokenize_texts(texts_, max_length=spec["max_length"]).input_ids)
        return real, embedded.total - before

    return (step, encode, forward_loss) if with_loss else (step, encode)


def st_peft_side(spec: dict, *, with_loss: bool = False):
    """(step, encode) of sentence-transformers + PEFT; ``with_loss`` as in :func:`latentembed_side`."""
    from peft import LoraConfig, get_peft_model
    from sentence_transformers import SentenceTransformer, losses, models

    device = torch.device(spec["device"])
    try:
        # Plain text: sentence-transformers 6 otherwise renders every text through the model
        # directory's chat template (SmolLM2-Instruct has one), which adds ~30 tokens per text.
        transformer = models.Transformer(
            spec["model"],
            max_seq_length=spec["max_length"],
            modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
            module_output_name="token_embeddings",
        )
    except TypeError:  # sentence-transformers < 6: plain text already
        transformer = models.Transformer(spec["model"], max_seq_length=spec["max_length"])
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), "mean")
    st = SentenceTransformer(modules=[transformer, pooling], device=str(device))
    backbone = transformer.auto_model
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=spec["dropout"], target_modules=list(LORA_TARGETS))
    transformer.auto_model = get_peft_model(backbone, config)
    if spec["checkpointing"]:
        transformer.auto_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    st.to(device)
    params = [p for p in st.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    loss_fn = losses.MultipleNegativesRankingLoss(st, scale=1.0 / TEMPERATURE)
    queries, positives, negatives = workload(spec["batch"])
    st.train()

    def forward_loss() -> tuple[torch.Tensor, int, int]:
        features = [
            {k: v.to(device) for k, v in st.tokenize(t).items() if isinstance(v, torch.Tensor)}
            for t in (queries, positives, negatives)
        ]
        real = sum(int(f["attention_mask"].sum()) for f in features)
        return loss_fn(features, None), real, sum(f["input_ids"].numel() for f in features)

    step = optimizer_step(forward_loss, optimizer, params)
    embedded = PositionCounter(backbone.get_input_embeddings())

    def encode(texts_: list[str]) -> tuple[int, int]:
        """Embed ``texts_``; returns (real tokens, positions computed)."""
        before = embedded.total
        st.encode(texts_, batch_size=32, convert_to_tensor=True)
        return int(st.tokenize(texts_)["attention_mask"].sum()), embedded.total - before

    return (step, encode, forward_loss) if with_loss else (step, encode)


# -- a tiny model for runs without --model --------------------------------------------------------


def tiny_model_dir(path: Path) -> Path:
    """Write a tiny random Llama checkpoint (config.json, model.safetensors, tokenizer.json) that
    both latentembed and transformers load; returns ``path``."""
    from safetensors.torch import save_file

    from ..models.decoder import DecoderModel
    from ..models.decoder_config import DecoderConfig
    from ..training.tiny import train_tokenizer

    q, p, n = workload(8)
    tokenizer = train_tokenizer(q + p + n + encode_texts(64), vocab_size=2048)
    vocab = tokenizer.tokenizer.get_vocab_size()
    cfg = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    decoder = DecoderModel(DecoderConfig(model_type="llama", **cfg))
    path.mkdir(parents=True, exist_ok=True)
    save_file({f"model.{k}": v.contiguous() for k, v in decoder.state_dict().items()}, str(path / "model.safetensors"))
    hf = dict(cfg, model_type="llama", architectures=["LlamaModel"], rms_norm_eps=1e-6, tie_word_embeddings=False)
    (path / "config.json").write_text(json.dumps(hf))
    tokenizer.tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "[PAD]", "unk_token": "[UNK]"})
    )
    return path
