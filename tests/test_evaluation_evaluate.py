"""evaluate_retrieval end to end with a real (if simple) encoder: hashed bag-of-words vectors."""

import re
import zlib

import pytest
import torch

from latentembed.evaluation import evaluate_retrieval, retrieval_metrics


class HashedBagOfWords:
    """A deterministic text encoder: each lower-cased word adds +-1 to one of ``dim`` coordinates
    chosen by its CRC32; the sum is L2-normalised. ``prefix`` is prepended to every text (as an
    instruction would be). Records the keyword arguments of every call."""

    def __init__(self, dim: int = 256, as_numpy: bool = False):
        self.dim, self.as_numpy, self.calls = dim, as_numpy, []

    def encode(self, texts, *, batch_size=32, prefix="", normalize=True):
        self.calls.append({"n": len(texts), "batch_size": batch_size, "prefix": prefix})
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", (prefix + text).lower()):
                h = zlib.crc32(word.encode())
                out[i, h % self.dim] += 1.0 if (h >> 16) & 1 else -1.0
        if normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out.numpy() if self.as_numpy else out


CORPUS = {
    "paris": "Paris is the capital and largest city of France.",
    "berlin": "Berlin is the capital of Germany and its largest city.",
    "python": "Python is a programming language that emphasises readability.",
    "rust": "Rust is a systems programming language focused on memory safety.",
    "tea": "Green tea is brewed from unoxidised leaves of the tea plant.",
    "coffee": "Coffee is brewed from roasted coffee beans.",
    "whale": "The blue whale is the largest animal known to have lived.",
    "moon": "The Moon is Earth's only natural satellite.",
}
QUERIES = {
    "q_france": "capital city of France",
    "q_memory": "programming language memory safety",
    "q_tea": "how is green tea brewed",
    "q_whale": "largest animal blue whale",
    "q_unjudged": "something with no relevant document",
}
QRELS = {
    "q_france": {"paris": 2, "berlin": 0},
    "q_memory": {"rust": 1, "python": 1},
    "q_tea": {"tea": 1},
    "q_whale": {"whale": 1},
    "q_unjudged": {"moon": 0},
}


def _brute_force_run(model, corpus, queries, qids):
    docs = list(corpus)
    d = torch.as_tensor(model.encode([corpus[x] for x in docs]))
    run = {}
    for qid in qids:
        q = torch.as_tensor(model.encode([queries[qid]]))[0]
        s = (d @ q).tolist()
        run[qid] = [(docs[j], s[j]) for j in sorted(range(len(docs)), key=lambda j: (-s[j], j))]
    return run


@pytest.mark.parametrize("as_numpy", [False, True])
def test_matches_brute_force_run(as_numpy):
    model = HashedBagOfWords(as_numpy=as_numpy)
    ks = (1, 3, 10)
    out = evaluate_retrieval(model, CORPUS, QUERIES, QRELS, k_values=ks, batch_size=3, chunk_size=3)
    run = _brute_force_run(HashedBagOfWords(), CORPUS, QUERIES, [q for q in QRELS if q != "q_unjudged"])
    expected = retrieval_metrics(run, QRELS, ks)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-6), key
    assert out["num_queries"] == 4 and out["num_queries_skipped"] == 1
    assert out["num_docs"] == 8 and out["embedding_dim"] == 256
    assert out["recall@10"] == 1.0  # 8 docs, k = 10: everything retrieved
    assert out["mrr@1"] > 0.5  # the word-overlap set is easy for a bag of words
    # one probe text per side, then corpus then queries; only the 4 judged queries are encoded;
    # batch_size passed through
    assert [c["n"] for c in model.calls] == [1, 1, 8, 4]
    assert all(c["batch_size"] == 3 for c in model.calls)


def test_query_and_doc_kwargs_and_run():
    model = HashedBagOfWords()
    out = evaluate_retrieval(
        model,
        CORPUS,
        QUERIES,
        QRELS,
        k_values=(2,),
        query_kwargs={"prefix": "query: "},
        doc_kwargs={"prefix": "passage: "},
        return_run=True,
    )
    assert [c["prefix"] for c in model.calls] == ["passage: ", "query: "] * 2
    run = out["run"]
    assert set(run) == {"q_france", "q_memory", "q_tea", "q_whale"}
    assert all(len(ranking) == 2 for ranking in run.values())
    assert run["q_france"][0][0] == "paris"
    assert retrieval_metrics(run, QRELS, (2,))["ndcg@2"] == out["ndcg@2"]


def test_ignore_identical_ids():
    corpus = {**CORPUS, "q_tea": "how is green tea brewed"}  # the query itself is in the corpus
    model = HashedBagOfWords()
    kept = evaluate_retrieval(model, corpus, QUERIES, QRELS, k_values=(1, 3), return_run=True)
    assert kept["run"]["q_tea"][0][0] == "q_tea" and len(kept["run"]["q_tea"]) == 3
    dropped = evaluate_retrieval(
        model, corpus, QUERIES, QRELS, k_values=(1, 3), return_run=True, ignore_identical_ids=True
    )
    deeper = evaluate_retrieval(model, corpus, QUERIES, QRELS, k_values=(4,), return_run=True)["run"]["q_tea"]
    assert dropped["run"]["q_tea"] == [(d, s) for d, s in deeper if d != "q_tea"][:3]
    assert len(dropped["run"]["q_tea"]) == 3 and "q_tea" not in [d for d, _ in dropped["run"]["q_tea"]]
    assert dropped["mrr@1"] >= kept["mrr@1"]


class _WrongShape(HashedBagOfWords):
    def encode(self, texts, **kwargs):
        return super().encode(texts, **kwargs)[:, None]


def test_errors():
    model = HashedBagOfWords()
    with pytest.raises(ValueError, match="unknown document id 'nope'"):
        evaluate_retrieval(model, CORPUS, QUERIES, {"q_tea": {"nope": 1}})
    with pytest.raises(ValueError, match="unknown query id 'q_x'"):
        evaluate_retrieval(model, CORPUS, QUERIES, {"q_x": {"tea": 1}})
    with pytest.raises(ValueError, match="no query has a relevant document"):
        evaluate_retrieval(model, CORPUS, QUERIES, {"q_tea": {"tea": 0}})
    with pytest.raises(ValueError, match="corpus: expected at least one document"):
        evaluate_retrieval(model, {}, QUERIES, {})
    with pytest.raises(ValueError, match=r"model.encode\(corpus\): expected shape \[1, D\]"):  # the probe
        evaluate_retrieval(_WrongShape(), CORPUS, QUERIES, QRELS)
    with pytest.raises(ValueError, match="k_values"):
        evaluate_retrieval(model, CORPUS, QUERIES, QRELS, k_values=(0,))
    assert all(isinstance(v, float) for k, v in evaluate_retrieval(model, CORPUS, QUERIES, QRELS).items() if "@" in k)
