"""Quantised embeddings (int8 / uint8 / binary / ubinary) against sentence-transformers'
``quantize_embeddings``, Hamming search against a float reference, rescoring, and the
per-precision evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentembed.evaluation.quantized import evaluate_precisions
from latentembed.evaluation.search import exact_search, exact_search_reference, hamming_search, rescore
from latentembed.modules.quantization import (
    PRECISIONS,
    bytes_per_vector,
    calibration_ranges,
    dequantize_embeddings,
    hamming_distance,
    quantize_embeddings,
    unpack_binary,
)

st_util = pytest.importorskip("sentence_transformers.util")


@pytest.mark.parametrize("precision", PRECISIONS[1:])
@pytest.mark.parametrize("dim", [8, 37])
def test_codes_equal_sentence_transformers(precision, dim):
    x, calib = torch.randn(50, dim), 1.5 * torch.randn(200, dim)
    x[0] = 9.0  # outside the calibration range: the end codes on both sides
    expected = st_util.quantize_embeddings(x.numpy(), precision=precision, calibration_embeddings=calib.numpy())
    ours = quantize_embeddings(x, precision, calibration=calib)
    assert ours.dtype == torch.from_numpy(expected).dtype and np.array_equal(ours.numpy(), expected)
    if precision.endswith("int8"):
        ranges = calibration_ranges(calib)
        assert torch.equal(quantize_embeddings(x, precision, ranges=ranges), ours)
        assert torch.equal(quantize_embeddings(x, precision, ranges=ranges.numpy()), ours)  # numpy too
        with pytest.warns(UserWarning, match="int8 buckets computed from the 50 embeddings"):
            own = quantize_embeddings(x, precision)
        assert np.array_equal(own.numpy(), st_util.quantize_embeddings(x.numpy(), precision=precision))


def test_dequantise_and_unpack():
    calib = torch.randn(300, 24)
    calib[:, 3] = 0.25  # a constant dimension (step 0)
    ranges = calibration_ranges(calib)
    step = ((ranges[1] - ranges[0]) / 255).max()
    for precision in ("int8", "uint8"):
        back = dequantize_embeddings(quantize_embeddings(calib, precision, ranges=ranges), precision, ranges=ranges)
        assert (back - calib)[:, [i for i in range(24) if i != 3]].abs().max() <= step / 2 + 1e-6
    for precision in ("binary", "ubinary"):
        assert torch.equal(unpack_binary(quantize_embeddings(calib, precision), 24), calib > 0)
    assert [bytes_per_vector(37, p) for p in PRECISIONS] == [148, 37, 37, 5, 5]


def test_quantisation_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"precision: expected one of \('float32', 'int8'.*got 'int4'"):
        quantize_embeddings(x, "int4")
    with pytest.raises(ValueError, match=r"ranges: expected a tensor \[2, 8\].*got \(2, 7\)"):
        quantize_embeddings(x, "int8", ranges=torch.zeros(2, 7))
    with pytest.raises(ValueError, match="single embedding"):
        quantize_embeddings(x[:1], "uint8")
    with pytest.raises(ValueError, match=r"embeddings: expected a floating-point tensor \[N, D\]"):
        quantize_embeddings(x.long(), "binary")
    with pytest.raises(ValueError, match="two packed code tensors of one dtype"):
        hamming_distance(quantize_embeddings(x, "binary"), quantize_embeddings(x, "ubinary"))


@pytest.mark.parametrize("precision", ["binary", "ubinary"])
def test_hamming_search_is_exact(precision):
    q, d = torch.randn(7, 20), torch.randn(131, 20)
    qc, dc = quantize_embeddings(q, precision), quantize_embeddings(d, precision)
    brute = ((q[:, None] > 0) != (d[None] > 0)).sum(-1).int()
    assert torch.equal(hamming_distance(qc, dc), brute)
    # +-1 vectors: dot = D - 2 * hamming, so the float reference ranks (and breaks ties) alike
    signs = lambda t: (t > 0).float() * 2 - 1  # noqa: E731
    _, ref_idx = exact_search_reference(signs(q), signs(d), 15)
    dist, idx = hamming_search(qc, dc, 15, chunk_size=16)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, torch.gather(brute, 1, idx))


def test_rescore_of_every_candidate_is_exact_search():
    q, d = torch.randn(5, 16), torch.randn(40, 16)
    every = torch.arange(40).expand(5, -1)
    (scores, idx), (ref_scores, ref_idx) = rescore(q, d, every, 7), exact_search(q, d, 7)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores)  # einsum and matmul round differently


def test_encode_precision_equals_sentence_transformers(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from tests.models.test_st_export import TEXTS, export, tiny_model

    model = tiny_model("mean")
    path = export(model, tmp_path / "st")
    calib = model.encode(TEXTS)
    theirs = st.SentenceTransformer(str(path), device="cpu")
    # sign bits of sentence-transformers' own encode (its floats equal ours to ~1e-7)
    assert np.array_equal(
        model.encode(TEXTS, precision="ubinary", convert_to="numpy"), theirs.encode(TEXTS, precision="ubinary")
    )
    # buckets: our floats on both sides (a value at a bucket edge may round either way otherwise)
    for precision in ("int8", "uint8"):
        ours = model.encode(TEXTS, precision=precision, calibration=2 * calib, convert_to="numpy")
        expected = st_util.quantize_embeddings(
            calib.numpy(), precision=precision, calibration_embeddings=2 * calib.numpy()
        )
        assert np.array_equal(ours, expected)
    assert model.encode(TEXTS[0], precision="binary").shape == (8,)
    with pytest.raises(ValueError, match="for one text needs ranges= or calibration="):
        model.encode(TEXTS[0], precision="int8")
    with pytest.raises(ValueError, match="set the int8 / uint8 buckets; precision is 'binary'"):
        model.encode(TEXTS, precision="binary", calibration=calib)


def test_evaluate_precisions_rows():
    torch.manual_seed(0)
    docs = torch.nn.functional.normalize(torch.randn(60, 32), dim=1)
    queries = torch.nn.functional.normalize(docs[:20] + 0.3 * torch.randn(20, 32), dim=1)
    qids, dids = [f"q{i}" for i in range(20)], [f"d{i}" for i in range(60)]
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(20)}
    rows = evaluate_precisions(queries, docs, query_ids=qids, doc_ids=dids, qrels=qrels, rescore_multiplier=60)
    by = {(r["precision"], r["search"]): r for r in rows}
    assert by[("float32", "dot product")]["kept"] == 1.0
    assert by[("int8", "float query . dequantised docs")]["bytes_per_vector"] == 32
    assert by[("binary", "hamming")]["bytes_per_vector"] == 4
    # rescoring all 60 documents with floats is the float32 search
    assert by[("ubinary", "hamming top-600, float rescore")]["ndcg@10"] == pytest.approx(
        by[("float32", "dot product")]["ndcg@10"]
    )
