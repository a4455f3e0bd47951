"""The native MTEB adapter, run by the installed ``mteb`` on a tiny retrieval task built from local
JSONL files (no download): its nDCG@10 must equal latentembed's own evaluation of the same model
and data, and each side must get its prompt."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from latentembed.evaluation.data import load_retrieval_dataset
from latentembed.evaluation.evaluate import evaluate_retrieval
from latentembed.evaluation.mteb_adapter import MTEBEncoder
from tests.models.test_st_export import tiny_model

mteb = pytest.importorskip("mteb")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DOCS = [
    "Bread is made from flour, water, salt and yeast; it is baked in an oven for an hour.",
    "a man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital and largest city of France.",
    "Tokenizers split text into tokens; offsets map each token back to its characters.",
    "An embedding maps text to a vector.",
    "Latent attention pooling, mean pooling and last-token pooling give sentence vectors.",
    "hello world, hello embeddings!",
]
QUERIES = ["how do I bake bread?", "who is playing music?", "what is the capital of france?", "what is an embedding?"]
QRELS = {"q0": {"d0": 1}, "q1": {"d1": 1}, "q2": {"d3": 1}, "q3": {"d5": 1, "d6": 1}}


def write_set(root):
    root.mkdir()
    with open(root / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(DOCS))
    with open(root / "queries.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(QUERIES))
    with open(root / "qrels.jsonl", "w") as f:
        f.writelines(
            json.dumps({"query-id": q, "corpus-id": d, "score": s}) + "\n"
            for q, ds in QRELS.items()
            for d, s in ds.items()
        )
    return load_retrieval_dataset(root / "corpus.jsonl", root / "queries.jsonl", root / "qrels.jsonl")


def local_task(corpus, queries, qrels):
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            type="Retrieval",
            name="LatentembedLocalRetrieval",
            main_score="ndcg_at_10",
            description="Given a question, retrieve passages that answer it",
            reference=None,
            dataset={"path": "local", "revision": "local"},
            category="t2t",
            eval_splits=["test"],
            eval_langs=["eng-Latn"],
            date=("2026-12-05", "2026-12-05"),
            dialect=[],
            domains=[],
            task_subtypes=[],
            license="cc-by-4.0",
            annotations_creators="derived",
            modalities=["text"],
            sample_creation="found",
            bibtex_citation="",
        )

        def load_data(self, num_proc=None, **kwargs):
            split = {
                "queries": Dataset.from_list([{"id": k, "text": v} for k, v in queries.items()]),
                "corpus": Dataset.from_list([{"id": k, "text": v, "title": ""} for k, v in corpus.items()]),
                "relevant_docs": {q: dict(ds) for q, ds in qrels.items()},
                "top_ranked": None,
            }
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return LocalRetrieval()


class Spy:
    """Records the encode keywords each call gets."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode(self, texts, **kwargs):
        self.calls.append((len(texts), {k: v for k, v in kwargs.items() if k in ("task", "instruction")}))
        return self.model.encode(texts, **kwargs)


@pytest.mark.parametrize("use_description", [False, True])
def test_mteb_scores_equal_latentembed_evaluation(tmp_path, use_description):
    corpus, queries, qrels = write_set(tmp_path / "set")
    model = tiny_model("mean", prompt_template="e5")
    spy = Spy(model)
    encoder = MTEBEncoder(spy, name="latentembed/tiny", use_task_description=use_description)
    result = mteb.evaluate(encoder, [local_task(corpus, queries, qrels)], cache=None, show_progress_bar=False)
    scores = result.task_results[0].scores["test"][0]
    description = "Given a question, retrieve passages that answer it"
    query_kwargs = {"instruction": description} if use_description else {"task": "retrieval"}
    ours = evaluate_retrieval(model, corpus, queries, qrels, k_values=(10,), query_kwargs=query_kwargs)
    assert scores["ndcg_at_10"] == pytest.approx(ours["ndcg@10"], abs=1e-5)  # MTEB rounds to 5 digits
    assert scores["mrr_at_10"] == pytest.approx(ours["mrr@10"], abs=1e-5)
    assert (len(DOCS), {"task": "document"}) in spy.calls
    assert (len(QUERIES), query_kwargs) in spy.calls
    assert result.model_name == "latentembed/tiny"


def test_protocol_surface():
    model = tiny_model("mean", prompt_template="nomic")
    encoder = MTEBEncoder(model, instructions={"SciFact": "Find the claim's evidence"})
    assert encoder.prompt_for("SciFact", "a description", "query") == {"instruction": "Find the claim's evidence"}
    assert encoder.prompt_for("NFCorpus", "a description", "query") == {"task": "search_query"}
    assert encoder.prompt_for("NFCorpus", "a description", "document") == {"task": "search_document"}
    assert encoder.prompt_for("STS12", "a description", None) == {"task": "search_query"}
    meta = encoder.mteb_model_meta
    assert meta.embed_dim == 64 and meta.similarity_fn_name.value == "cosine" and meta.use_instructions
    a, b = model.encode(["hello", "bread"]), model.encode(["a fox", "bread"])
    sim = encoder.similarity(a.numpy(), b.numpy())
    assert sim.shape == (2, 2) and sim[1, 1] == pytest.approx(1.0, abs=1e-6)
    assert encoder.similarity_pairwise(a, b)[1] == pytest.approx(1.0, abs=1e-6)
    # instruction-retrieval rows: each query with its own instruction, in row order
    from types import SimpleNamespace

    batches = [
        {"text": ["a cat", "bread"], "instruction": ["Find pets", ""]},
        {"text": ["a fox"], "instruction": ["Find pets"]},
    ]
    got = encoder.encode(batches, task_metadata=SimpleNamespace(name="X"), hf_split="test", hf_subset="default")
    expected = [
        model.encode(["a cat"], instruction="Find pets"),
        model.encode(["bread"], task="search_query"),
        model.encode(["a fox"], instruction="Find pets"),
    ]
    assert np.allclose(got, np.concatenate([e.numpy() for e in expected]), atol=1e-6)
    with pytest.raises(TypeError, match="expected a latentembed EmbeddingModel, got str"):
        MTEBEncoder("intfloat/e5-mistral-7b-instruct")


def test_exported_directory_scores_the_same_in_mteb(tmp_path):
    """MTEB's own sentence-transformers wrapper on the export (its "query" / "document" prompts)
    and the native adapter on the model give one score."""
    from sentence_transformers import SentenceTransformer

    corpus, queries, qrels = write_set(tmp_path / "set")
    model = tiny_model("last", prompt_template="e5")
    model.save_pretrained(tmp_path / "st", format="sentence-transformers")
    task = local_task(corpus, queries, qrels)
    native = mteb.evaluate(MTEBEncoder(model), [task], cache=None, show_progress_bar=False)
    exported = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    through_st = mteb.evaluate(exported, [task], cache=None, show_progress_bar=False)
    a, b = (r.task_results[0].scores["test"][0] for r in (native, through_st))
    assert a["ndcg_at_10"] == pytest.approx(b["ndcg_at_10"], abs=1e-5)
    assert a["mrr_at_10"] == pytest.approx(b["mrr_at_10"], abs=1e-5)
