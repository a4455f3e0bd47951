"""nDCG@k / MRR@k / recall@k: hand-computed cases and an independent brute-force implementation.

pytrec_eval and ir_measures are not installed here (no network), so the cross-check is a second
implementation written differently (numpy, per cut-off from scratch) from trec_eval's definitions.
"""

import math
import random

import numpy as np
import pytest

from latentembed.evaluation.metrics import count_evaluable_queries, per_query_metrics, retrieval_metrics

L3 = math.log2(3)


def test_graded_relevance_hand_computed():
    qrels = {"q": {"a": 2, "b": 1, "c": 0}}
    m = retrieval_metrics({"q": ["x", "b", "a"]}, qrels, k_values=(1, 5))
    assert m["ndcg@1"] == 0.0 and m["mrr@1"] == 0.0 and m["recall@1"] == 0.0
    # DCG@5 = 1/log2(3) + 2/log2(4); ideal = 2/log2(2) + 1/log2(3)
    assert m["ndcg@5"] == pytest.approx((1 / L3 + 1.0) / (2 + 1 / L3), abs=1e-12)
    assert m["mrr@5"] == 0.5
    assert m["recall@5"] == 1.0
    assert list(m) == ["ndcg@1", "ndcg@5", "mrr@1", "mrr@5", "recall@1", "recall@5"]


def test_no_relevant_in_top_k_and_k_larger_than_list():
    qrels = {"q": {"a": 1, "b": 1}}
    m = retrieval_metrics({"q": ["x", "y", "a"]}, qrels, k_values=(2, 10))
    assert (m["ndcg@2"], m["mrr@2"], m["recall@2"]) == (0.0, 0.0, 0.0)
    # k = 10 > 3 ranked: a at rank 3; ideal has both relevant docs although only one is ranked.
    assert m["ndcg@10"] == pytest.approx((1 / 2) / (1 + 1 / L3), abs=1e-12)
    assert m["mrr@10"] == pytest.approx(1 / 3)
    assert m["recall@10"] == 0.5


def test_ties_keep_given_order_and_ranked_list_used_as_given():
    qrels = {"q": {"b": 1}}
    # (doc, score) pairs are stably sorted by decreasing score: c, a, b.
    assert retrieval_metrics({"q": [("a", 0.5), ("b", 0.5), ("c", 0.9)]}, qrels, (10,))["mrr@10"] == pytest.approx(
        1 / 3
    )
    # the same scores given in another order: c, b, a.
    assert retrieval_metrics({"q": [("b", 0.5), ("a", 0.5), ("c", 0.9)]}, qrels, (10,))["mrr@10"] == 0.5
    # plain id lists are not re-sorted.
    assert retrieval_metrics({"q": ["b", "c"]}, qrels, (10,))["mrr@10"] == 1.0


def test_missing_queries_count_as_zero_and_unjudged_queries_are_skipped():
    qrels = {"q1": {"a": 1}, "q2": {"b": 3}, "q3": {"c": 0, "d": -1}, "q4": {}}
    results = {"q1": ["a"], "q3": ["c"], "extra": ["a"]}  # q2 missing; extra not in qrels
    m = retrieval_metrics(results, qrels, k_values=(1,))
    assert m == {"ndcg@1": 0.5, "mrr@1": 0.5, "recall@1": 0.5}
    assert count_evaluable_queries(qrels) == (2, 2)
    assert set(per_query_metrics(results, qrels, (1,))) == {"q1", "q2"}
    assert retrieval_metrics({"q1": []}, {"q1": {"a": 1}}, (5,)) == {"ndcg@5": 0.0, "mrr@5": 0.0, "recall@5": 0.0}


def test_non_positive_grades_are_not_relevant():
    qrels = {"q": {"a": -1, "z": 0, "b": 1}}
    m = retrieval_metrics({"q": ["a", "z", "b"]}, qrels, k_values=(3,))
    assert m["mrr@3"] == pytest.approx(1 / 3)
    assert m["recall@3"] == 1.0
    assert m["ndcg@3"] == pytest.approx((1 / 2) / 1.0)


def test_errors():
    with pytest.raises(ValueError, match="no query has a relevant document"):
        retrieval_metrics({"q": ["a"]}, {"q": {"a": 0}})
    with pytest.raises(ValueError, match="ranked more than once"):
        retrieval_metrics({"q": ["a", "b", "a"]}, {"q": {"a": 1}})
    for bad in [(0,), (5, -1), (), (1.5,), (True,)]:
        with pytest.raises(ValueError, match="k_values"):
            retrieval_metrics({"q": ["a"]}, {"q": {"a": 1}}, k_values=bad)
    with pytest.raises(TypeError, match="k_values"):
        retrieval_metrics({"q": ["a"]}, {"q": {"a": 1}}, k_values=10)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics({"q": [("a", float("nan"))]}, {"q": {"a": 1}})
    with pytest.raises(TypeError, match="document ids as str"):
        retrieval_metrics({"q": [3]}, {"q": {"a": 1}})


def _brute_force(results, qrels, k):
    """trec_eval's definitions, written from scratch with numpy per query and cut-off."""
    rows = []
    for qid, judged in qrels.items():
        rel = np.array([g for g in judged.values() if g > 0], dtype=float)
        if rel.size == 0:
            continue
        run = results.get(qid, [])
        ids = [d for d, _ in sorted(run, key=lambda p: -p[1])][:k]
        gains = np.array([max(judged.get(d, 0), 0) for d in ids], dtype=float)
        disc = 1.0 / np.log2(np.arange(2, k + 2))
        dcg = float((gains * disc[: gains.size]).sum())
        ideal = np.sort(rel)[::-1][:k]
        idcg = float((ideal * disc[: ideal.size]).sum())
        hits = np.nonzero(gains > 0)[0]
        rows.append((dcg / idcg, 1.0 / (hits[0] + 1) if hits.size else 0.0, (gains > 0).sum() / rel.size))
    return np.mean(rows, axis=0)


@pytest.mark.parametrize("trial", range(3))
def test_against_brute_force(trial):
    rng = random.Random(1000 + trial)
    docs = [f"d{i}" for i in range(40)]
    qrels, results = {}, {}
    for q in range(25):
        qid = f"q{q}"
        qrels[qid] = {d: rng.choice([-1, 0, 1, 1, 2, 3]) for d in rng.sample(docs, rng.randint(0, 6))}
        if rng.random() < 0.9:
            ranked = rng.sample(docs, rng.randint(0, 30))
            results[qid] = [(d, rng.random()) for d in ranked]  # distinct scores: no ties
    ks = (1, 3, 5, 10, 100)
    m = retrieval_metrics(results, qrels, ks)
    for k in ks:
        ndcg, mrr, recall = _brute_force(results, qrels, k)
        assert m[f"ndcg@{k}"] == pytest.approx(ndcg, abs=1e-12)
        assert m[f"mrr@{k}"] == pytest.approx(mrr, abs=1e-12)
        assert m[f"recall@{k}"] == pytest.approx(recall, abs=1e-12)


def test_pytrec_eval_style_run_dicts_are_sorted_by_score():
    qrels = {"q": {"b": 1}}
    as_dict = retrieval_metrics({"q": {"a": 0.1, "b": 0.9}}, qrels, (1,))
    as_pairs = retrieval_metrics({"q": [("a", 0.1), ("b", 0.9)]}, qrels, (1,))
    assert as_dict == as_pairs and as_dict["ndcg@1"] == 1.0
