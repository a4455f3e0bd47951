"""tokenize_with_prompts / TextTokenizer / pack_sequences on three real tokenizers (tests/tokenizer_helpers.py):
byte-level BPE (tokens carry the leading space), Metaspace with BOS from TemplateProcessing, WordPiece
with [CLS]/[SEP] (offsets skip spaces). The instruction masks are checked against oracles that do not
share the implementation: hand-written token lists, a direct offsets rule on a separate encode, and
decoding the excluded / pooled tokens back into the prefix / text."""

import json
import random

import pytest
import torch

from latentembed.prompts import TEMPLATES, resolve_prompt
from latentembed.tokenization import (
    PackedBatch,
    TextTokenizer,
    TokenizedTexts,
    pack_sequences,
    tokenize_with_prompts,
)
from tests.tokenizer_helpers import CORPUS, KINDS, SPECIALS, build_tokenizer, hf_tokenizer, raw_tokenizer


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    return {k: build_tokenizer(k, root / k) for k in KINDS}


@pytest.fixture(scope="module")
def toks(tok_dirs):
    return {k: TextTokenizer.from_pretrained(tok_dirs[k]) for k in KINDS}


def rng():
    return random.Random(int(torch.randint(0, 2**31, ())))


def tokens(tok, ids):
    return [tok.tokenizer.id_to_token(i) for i in ids]


UNK = {"bpe": None, "metaspace": "<unk>", "wordpiece": "[UNK]"}


def squash(s, kind):
    s = "".join(s.split())
    return s.lower().replace("##", "") if kind == "wordpiece" else s


def random_cases(r, n):
    """(prefix, text) pairs: a corpus sentence (or two) cut at a random character, and template prefixes."""
    cases = []
    prompts = [resolve_prompt(name, task=task).prefix for name, t in TEMPLATES.items() for task in t.tasks]
    for _ in range(n):
        s = r.choice(CORPUS) + (" " + r.choice(CORPUS) if r.random() < 0.3 else "")
        cut = r.randrange(len(s) + 1)
        cases.append((s[:cut], s[cut:]))
        cases.append((r.choice(prompts), r.choice(CORPUS)[r.randrange(5) :]))
    return cases


# ------------------------------------------------------------------------------------ exact masks
HAND_BUILT = {  # (prefix, text) -> kind -> [(token, pooled)]
    ("search_query: ", "what is an embedding?"): {
        "bpe": [
            ("search", 0),
            ("_", 0),
            ("qu", 0),
            ("ery", 0),
            (":", 0),
            ("Ġwhat", 1),
            ("Ġis", 1),
            ("Ġan", 1),
            ("Ġembedding", 1),
            ("?", 1),
            ("<|endoftext|>", 1),
        ],
        "metaspace": [
            ("<s>", 1),
            ("▁search_query:", 0),
            ("▁what", 1),
            ("▁is", 1),
            ("▁an", 1),
            ("▁embedding?", 1),
            ("</s>", 1),
        ],
        "wordpiece": [
            ("[CLS]", 1),
            ("search", 0),
            ("_", 0),
            ("query", 0),
            (":", 0),
            ("what", 1),
            ("is", 1),
            ("an", 1),
            ("embedding", 1),
            ("?", 1),
            ("[SEP]", 1),
        ],
    },
    # the prefix ends inside a word: the token holding "doc" + "ument" carries text, so it is pooled
    ("Represent the doc", "ument for retrieval"): {
        "bpe": [
            ("Represent", 0),
            ("Ġthe", 0),
            ("Ġdocument", 1),
            ("Ġfor", 1),
            ("Ġretriev", 1),
            ("al", 1),
            ("<|endoftext|>", 1),
        ],
        "metaspace": [
            ("<s>", 1),
            ("▁Represent", 0),
            ("▁the", 0),
            ("▁document", 1),
            ("▁for", 1),
            ("▁retriev", 1),
            ("al", 1),
            ("</s>", 1),
        ],
        "wordpiece": [
            ("[CLS]", 1),
            ("represent", 0),
            ("the", 0),
            ("document", 1),
            ("for", 1),
            ("r", 1),
            ("##e", 1),
            ("##t", 1),
            ("##r", 1),
            ("##i", 1),
            ("##e", 1),
            ("##v", 1),
            ("##al", 1),
            ("[SEP]", 1),
        ],
    },
}


@pytest.mark.parametrize("kind", KINDS)
def test_exact_mask_hand_built(toks, kind):
    tok = toks[kind]
    for (prefix, text), expected in HAND_BUILT.items():
        out = tokenize_with_prompts(tok, [text], prefix)
        got = [(t, int(m)) for t, m in zip(tokens(tok, out.input_ids[0]), out.pool_mask[0])]
        assert got == expected[kind], (prefix, text)
        assert out.num_instruction_tokens == [sum(1 - m for _, m in expected[kind])]
        assert out.truncated == [False]


@pytest.mark.parametrize("kind", KINDS)
def test_exact_mask_offsets_and_decode_oracles(toks, kind):
    tok, raw = toks[kind], raw_tokenizer(kind)
    cases = random_cases(rng(), 25)
    out = tokenize_with_prompts(tok, [t for _, t in cases], [p for p, _ in cases])
    for (prefix, text), ids, mask, n_instr in zip(cases, out.input_ids, out.pool_mask, out.num_instruction_tokens):
        enc = raw.encode(prefix + text)
        P = len(prefix)
        # 1. excluded positions = the non-special tokens whose span ends inside the prefix
        excluded = [
            j for j, (s, (a, b)) in enumerate(zip(enc.special_tokens_mask, enc.offsets)) if not s and b <= P and P > 0
        ]
        assert [j for j, m in enumerate(mask) if not m] == excluded, (prefix, text)
        assert n_instr == len(excluded)
        assert ids[: len(enc.ids)] == enc.ids
        # 2. every token that touches a text character is pooled, straddlers included
        for j, (_a, b) in enumerate(enc.offsets):
            if b > P:
                assert mask[j]
        # 3. decoding: excluded tokens give (a start of) the prefix, pooled ones end with the text
        ex_ids = [enc.ids[j] for j in excluded]
        pooled = [i for j, i in enumerate(enc.ids) if mask[j] and not enc.special_tokens_mask[j]]
        ex_text, pooled_text = raw.decode(ex_ids), raw.decode(pooled)
        if UNK[kind] in enc.tokens:  # an unknown character decodes to nothing
            continue
        if kind == "bpe":  # byte-level decoding is lossless
            assert ex_text + pooled_text == prefix + text
            assert prefix.startswith(ex_text) and pooled_text.endswith(text)
        else:
            assert squash(ex_text, kind) + squash(pooled_text, kind) == squash(prefix + text, kind)
            assert squash(pooled_text, kind).endswith(squash(text, kind))
        if prefix.endswith(" ") and (not text or not text[0].isspace()):  # (Metaspace keeps "\n" in words)
            assert squash(pooled_text, kind) == squash(text, kind)


def test_exact_mask_bpe_any_unicode(toks):
    """Byte-level BPE encodes any text; multi-byte characters split into several tokens that share
    one character span. Decoding the excluded / pooled tokens gives back prefix / text exactly."""
    tok, r = toks["bpe"], rng()
    alphabet = "ab xyz\n\t  éü日本語🙂—,.:"
    pairs = [
        (
            "".join(r.choice(alphabet) for _ in range(r.randrange(12))),
            "".join(r.choice(alphabet) for _ in range(r.randrange(12))),
        )
        for _ in range(60)
    ]
    out = tokenize_with_prompts(tok, [t for _, t in pairs], [p for p, _ in pairs])
    for (prefix, text), ids, mask in zip(pairs, out.input_ids, out.pool_mask):
        assert ids[-1] == tok.eos_token_id and mask[-1]
        ex = tok.decode([i for i, m in zip(ids, mask) if not m])
        pooled = tok.decode([i for i, m in zip(ids[:-1], mask[:-1]) if m])
        assert ex + pooled == prefix + text and prefix.startswith(ex) and pooled.endswith(text)


def test_exact_mask_with_trimmed_offsets():
    """GPT-2's ByteLevel(trim_offsets=True) moves a lone space token's span to a zero-width span
    after the space: a trailing-space token of the prefix then sits at (P, P) and is still prefix."""
    from tokenizers import processors

    raw = raw_tokenizer("bpe")
    raw.post_processor = processors.ByteLevel(trim_offsets=True)
    tok = TextTokenizer.wrap(raw, eos_token="<|endoftext|>")
    out = tokenize_with_prompts(tok, ["", "hello", " hello"], "search_query: ")
    got = [[(t, int(m)) for t, m in zip(tokens(tok, ids), mask)] for ids, mask in zip(out.input_ids, out.pool_mask)]
    head = [("search", 0), ("_", 0), ("qu", 0), ("ery", 0), (":", 0)]
    assert got[0] == head + [("Ġ", 0), ("<|endoftext|>", 1)]
    assert got[1] == head + [("Ġhe", 1), ("llo", 1), ("<|endoftext|>", 1)]
    assert got[2] == head + [("Ġ", 0), ("Ġhe", 1), ("llo", 1), ("<|endoftext|>", 1)]


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens_pooled_and_mode_none(toks, kind):
    tok = toks[kind]
    out = tokenize_with_prompts(tok, ["a cat", ""], "Instruct: Retrieve semantically similar text\nQuery: ")
    for ids, mask in zip(out.input_ids, out.pool_mask):
        assert ids[-1] == tok.eos_token_id and mask[-1]
        if kind != "bpe":
            assert ids[0] == tok.bos_token_id and mask[0]
    none = tokenize_with_prompts(tok, ["a cat", ""], "Instruct: x\nQuery: ", mask_instruction="none")
    assert all(all(m) for m in none.pool_mask)
    assert none.num_instruction_tokens[0] > 0


# ---------------------------------------------------------------------------------- nvembed_compat
@pytest.mark.parametrize("kind", KINDS)
def test_nvembed_compat_excludes_first_n_positions(toks, kind):
    tok, raw = toks[kind], raw_tokenizer(kind)
    for prefix, text in random_cases(rng(), 10):
        out = tokenize_with_prompts(tok, [text], prefix, mask_instruction="nvembed_compat")
        n = len(raw.encode(prefix, add_special_tokens=False).ids) if prefix else 0
        expected = [j >= n for j in range(len(out.input_ids[0]))]
        if not any(expected):
            expected[-1] = True
        assert out.pool_mask[0] == expected


def test_nvembed_compat_off_by_one_with_bos(toks):
    """Metaspace adds BOS: NV-Embed's mask[:n] = 0 drops BOS and keeps the last instruction token."""
    tok, raw = toks["metaspace"], raw_tokenizer("metaspace")
    prefix, text = "Instruct: Retrieve semantically similar text\nQuery:", " a man is playing a guitar."
    alone = raw.encode(prefix, add_special_tokens=False).ids
    n = len(alone)
    compat = tokenize_with_prompts(tok, [text], prefix, mask_instruction="nvembed_compat")
    exact = tokenize_with_prompts(tok, [text], prefix)
    ids = compat.input_ids[0]
    assert ids == exact.input_ids[0] and ids[0] == tok.bos_token_id and ids[1 : n + 1] == alone
    assert compat.pool_mask[0] == [False] * n + [True] * (len(ids) - n)  # BOS .. instr[n-2] out
    assert exact.pool_mask[0] == [True] + [False] * n + [True] * (len(ids) - n - 1)


# ---------------------------------------------------------------------------- EOS, truncation, empty
@pytest.mark.parametrize("kind", KINDS)
def test_eos_appended_once(toks, kind):
    tok = toks[kind]
    texts = ["hello world"] + (["hello world" + tok.eos_token] if kind != "wordpiece" else [])
    out = tokenize_with_prompts(tok, texts, add_eos=True)
    for ids in out.input_ids:
        assert ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id
    if kind != "wordpiece":  # a literal EOS ending the text stays last under truncation
        cut = tokenize_with_prompts(tok, ["hello world and more words" + tok.eos_token], max_length=3)
        assert cut.input_ids[0][-1] == tok.eos_token_id and len(cut.input_ids[0]) == 3
    no = tokenize_with_prompts(tok, ["hello world"], add_eos=False)
    assert no.input_ids[0] == tok.encode("hello world")
    if kind != "wordpiece":  # wordpiece's [SEP] is its EOS and is always there
        assert no.input_ids[0][-1] != tok.eos_token_id


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["exact", "none"])
def test_truncation_keeps_prefix_and_eos(toks, kind, mode):
    tok = toks[kind]
    prefix, text = "Instruct: Given a question, retrieve passages\nQuery: ", "how do I bake bread in an oven?"
    full = tokenize_with_prompts(tok, [text], prefix, mask_instruction=mode)
    ids, mask = full.input_ids[0], full.pool_mask[0]
    enc = raw_tokenizer(kind).encode(prefix + text)
    # kept whatever max_length: a leading BOS/[CLS], every token holding a prefix character, EOS/[SEP]
    minimum = (
        sum(
            1
            for j, (s, (a, _)) in enumerate(zip(enc.special_tokens_mask, enc.offsets))
            if (s and j == 0) or (not s and a < len(prefix))
        )
        + 1
    )
    for L in range(minimum, len(ids) + 2):
        out = tokenize_with_prompts(tok, [text], prefix, max_length=L, mask_instruction=mode)
        got, m = out.input_ids[0], out.pool_mask[0]
        assert len(got) == min(L, len(ids)) and out.truncated == [L < len(ids)]
        assert got[-1] == tok.eos_token_id and m[-1]
        assert got[:-1] == ids[: len(got) - 1] and m[:-1] == mask[: len(got) - 1]
        assert out.num_instruction_tokens == full.num_instruction_tokens
    with pytest.raises(ValueError, match=f"max_length={minimum - 1} cannot hold the prefix"):
        tokenize_with_prompts(tok, [text], prefix, max_length=minimum - 1, mask_instruction=mode)


@pytest.mark.parametrize("kind", ["bpe", "metaspace"])
def test_truncation_nvembed_compat_cuts_after_eos(toks, kind):
    tok = toks[kind]
    prefix, text = "Instruct: Retrieve semantically similar text\nQuery: ", "a man is playing a guitar."
    full = tokenize_with_prompts(tok, [text], prefix, mask_instruction="nvembed_compat").input_ids[0]
    out = tokenize_with_prompts(tok, [text], prefix, max_length=len(full) - 2, mask_instruction="nvembed_compat")
    assert out.input_ids[0] == full[:-2] and out.truncated == [True] and out.input_ids[0][-1] != tok.eos_token_id
    assert tokenize_with_prompts(
        tok, [text], prefix, max_length=len(full), mask_instruction="nvembed_compat"
    ).truncated == [False]


@pytest.mark.parametrize("kind", KINDS)
def test_empty_texts(toks, kind):
    tok = toks[kind]
    out = tokenize_with_prompts(tok, ["", ""], ["", "search_query: "])
    specials = {tok.bos_token_id, tok.eos_token_id}
    for ids, mask in zip(out.input_ids, out.pool_mask):
        assert any(mask) and ids[-1] == tok.eos_token_id
        assert [i for i, m in zip(ids, mask) if m] == [i for i in ids if i in specials]
    assert out.num_instruction_tokens[0] == 0 and out.num_instruction_tokens[1] > 0
    for mode in ("exact", "nvembed_compat", "none"):
        o = tokenize_with_prompts(tok, [""], "search_query: ", add_eos=kind == "wordpiece", mask_instruction=mode)
        assert any(o.pool_mask[0])


def test_empty_text_without_eos(toks):
    tok = toks["bpe"]
    out = tokenize_with_prompts(tok, [""], "search_query: ", add_eos=False)  # only prefix tokens
    assert out.pool_mask[0] == [False] * (len(out.input_ids[0]) - 1) + [True]  # last token pooled
    with pytest.raises(ValueError, match="text 1 and its prefix produced no tokens"):
        tokenize_with_prompts(tok, ["a", ""], add_eos=False)


# ------------------------------------------------------------------------------ backends and loading
@pytest.mark.parametrize("kind", KINDS)
def test_tokenizers_and_transformers_backends_agree(toks, tok_dirs, kind):
    from transformers import AutoTokenizer

    raw = toks[kind]
    backends = [
        TextTokenizer.wrap(hf_tokenizer(kind)),
        TextTokenizer.wrap(AutoTokenizer.from_pretrained(str(tok_dirs[kind]))),
    ]
    cases = random_cases(rng(), 8)
    texts, prefixes = [t for _, t in cases], [p for p, _ in cases]
    for hf in backends:
        assert hf.backend == "transformers" and raw.backend == "tokenizers"
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
            raw.bos_token_id,
            raw.eos_token_id,
            raw.pad_token_id,
        )
        for mode in ("exact", "nvembed_compat", "none"):
            for L in (None, 30, 60):
                results = []
                for t in (raw, hf):
                    try:
                        results.append(tokenize_with_prompts(t, texts, prefixes, mask_instruction=mode, max_length=L))
                    except ValueError as e:  # a prefix longer than L: both must say so
                        results.append(str(e))
                assert results[0] == results[1]
        assert all(raw.count_tokens(p) == hf.count_tokens(p) for p in prefixes)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["tokenizers", "transformers"])
def test_save_pretrained_round_trip(toks, tmp_path, kind, backend):
    tok = toks[kind] if backend == "tokenizers" else TextTokenizer.wrap(hf_tokenizer(kind))
    tok.save_pretrained(tmp_path / "saved")
    back = TextTokenizer.from_pretrained(tmp_path / "saved")
    assert back.backend == "tokenizers" and back.vocab_size == tok.vocab_size
    assert (back.bos_token, back.eos_token, back.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    texts = [c for c in CORPUS[:4]]
    assert tokenize_with_prompts(back, texts, "search_query: ") == tokenize_with_prompts(tok, texts, "search_query: ")
    if backend == "tokenizers":
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
        assert hf.eos_token == tok.eos_token and hf(texts[0])["input_ids"] == tok.encode(texts[0])


def test_from_pretrained_reads_special_tokens_map_and_ignores_truncation(tmp_path):
    raw = raw_tokenizer("metaspace")
    raw.enable_truncation(4)
    raw.enable_padding(length=50)
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": {"__type": "AddedToken", "content": "</s>"}}
        )
    )
    tok = TextTokenizer.from_pretrained(tmp_path / "tokenizer.json")
    assert tok.bos_token_id == raw.token_to_id("<s>") and tok.eos_token_id == raw.token_to_id("</s>")
    assert tok.pad_token_id is None
    assert len(tok.encode(CORPUS[0])) > 4  # truncation / padding of the file are ignored
    ids = tokenize_with_prompts(tok, [CORPUS[0]]).input_ids[0]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) < 50


def test_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        TextTokenizer.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ValueError, match="eos_token '<eos>' is not in the tokenizer's vocabulary"):
        TextTokenizer(raw_tokenizer("bpe"), eos_token="<eos>")
    with pytest.raises(TypeError, match="tokenizers.Tokenizer, a transformers fast tokenizer"):
        TextTokenizer.wrap(object())

    class Slow:
        is_fast = False

        def tokenize(self, text):
            return text.split()

    with pytest.raises(TypeError, match="slow"):
        TextTokenizer.wrap(Slow())
    with pytest.raises(ValueError, match="no eos_token"):
        tokenize_with_prompts(raw_tokenizer("bpe"), ["a"])  # a raw Tokenizer knows no EOS
    assert tokenize_with_prompts(raw_tokenizer("bpe"), ["a"], add_eos=False).input_ids[0]


def test_wrap_and_count_tokens(toks):
    tok = toks["wordpiece"]
    assert TextTokenizer.wrap(tok) is tok
    assert tok.count_tokens("") == 0
    assert tok.count_tokens("search_query: ") == 4 == len(tok.encode("search_query: ", add_special_tokens=False))
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert "wordpiece" not in repr(tok) and "backend='tokenizers'" in repr(tok)


def test_argument_errors(toks):
    tok = toks["bpe"]
    with pytest.raises(ValueError, match=r"mask_instruction must be one of \('exact', 'nvembed_compat', 'none'\)"):
        tokenize_with_prompts(tok, ["a"], mask_instruction="nvembed")
    with pytest.raises(TypeError, match="not a single str"):
        tokenize_with_prompts(tok, "a text")
    with pytest.raises(TypeError, match=r"texts\[2\] must be a str, got NoneType"):
        tokenize_with_prompts(tok, ["a", "b", None])
    with pytest.raises(TypeError, match=r"prefix\[1\] must be a str"):
        tokenize_with_prompts(tok, ["a", "b"], ["x", 3])
    with pytest.raises(ValueError, match="prefix has 1 entries for 2 texts"):
        tokenize_with_prompts(tok, ["a", "b"], ["x"])
    for bad in (0, -3, True, 2.0):
        with pytest.raises(ValueError, match="max_length must be a positive int"):
            tokenize_with_prompts(tok, ["a"], max_length=bad)
    assert tokenize_with_prompts(tok, []) == TokenizedTexts([], [], [], [])


# ----------------------------------------------------------------------------------------- packing
def test_pack_and_padded():
    lengths = [3, 1, 127, 5]
    ids = [torch.randint(0, 500, (n,)).tolist() for n in lengths]
    masks = [(torch.rand(n) < 0.6).tolist() for n in lengths]
    b = pack_sequences(ids, masks)
    assert b.input_ids.dtype == torch.int64 and b.cu_seqlens.dtype == torch.int32 and b.pool_mask.dtype == torch.bool
    assert b.cu_seqlens.tolist() == [0, 3, 4, 131, 136] and b.max_seqlen == 127
    assert b.num_tokens == 136 and b.batch_size == 4 and b.lengths.tolist() == lengths
    for k in range(4):
        s, e = b.cu_seqlens[k], b.cu_seqlens[k + 1]
        assert b.input_ids[s:e].tolist() == ids[k] and b.pool_mask[s:e].tolist() == masks[k]
    pad_ids, attn, pool = b.padded(pad_token_id=-7)
    assert pad_ids.shape == attn.shape == pool.shape == (4, 127) and attn.dtype == pool.dtype == torch.bool
    for k, n in enumerate(lengths):
        assert pad_ids[k, :n].tolist() == ids[k] and (pad_ids[k, n:] == -7).all()
        assert attn[k].tolist() == [True] * n + [False] * (127 - n)
        assert pool[k, :n].tolist() == masks[k] and not pool[k, n:].any()
    moved = b.to("cpu")
    assert isinstance(moved, PackedBatch) and torch.equal(moved.input_ids, b.input_ids) and moved.max_seqlen == 127


def test_pack_tokenized_texts(toks):
    out = tokenize_with_prompts(toks["metaspace"], ["a cat", "", "the quick brown fox"], "search_query: ")
    b = out.pack()
    assert b.lengths.tolist() == out.lengths and b.pool_mask.sum() == sum(map(sum, out.pool_mask))
    _, _, pool = b.padded()
    assert (pool.sum(1) >= 1).all()


def test_pack_errors_and_empty_batch():
    with pytest.raises(ValueError, match="sequence 1: 2 input_ids but 1 pool_mask"):
        pack_sequences([[1], [2, 3]], [[True], [True]])
    with pytest.raises(ValueError, match="input_ids has 2 sequences but pool_mask has 1"):
        pack_sequences([[1], [2]], [[True]])
    with pytest.raises(ValueError, match="sequence 0 is empty"):
        pack_sequences([[]], [[]])
    b = pack_sequences([], [])
    assert b.num_tokens == 0 and b.batch_size == 0 and b.cu_seqlens.tolist() == [0]
    assert [t.shape for t in b.padded()] == [(0, 0)] * 3


def test_specials_table_matches_saved_config(tok_dirs):
    for kind in KINDS:
        cfg = json.loads((tok_dirs[kind] / "tokenizer_config.json").read_text())
        assert all(cfg[k] == v for k, v in SPECIALS[kind].items())


@pytest.mark.parametrize("backend", ["raw", "transformers"])
def test_special_token_overrides_survive_save(tmp_path, backend):
    tok = raw_tokenizer("metaspace") if backend == "raw" else hf_tokenizer("metaspace")
    wrapped = TextTokenizer(tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    wrapped.save_pretrained(tmp_path)
    loaded = TextTokenizer.from_pretrained(tmp_path)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
        wrapped.bos_token_id,
        wrapped.eos_token_id,
        wrapped.eos_token_id,
    )
