"""The trainer end to end on CPU with a tiny random model: the loss falls and retrieval improves,
a 2-process gloo run equals one process on the whole batch, the CLI saves a reloadable model,
and bad input fails with clear messages.

Every run takes a fresh seed (the session seed, see conftest) and a small slice of the bundled
data; the distributed run forks its two ranks from a fresh launcher process (as
tests/models/test_decoder_ddp.py does: forking the test process itself can deadlock).
"""

import faulthandler
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from latentembed.evaluation import evaluate_retrieval
from latentembed.models.embedding import EmbeddingModel
from latentembed.training.cli import main as cli_main
from latentembed.training.data import TrainingExample, bundled_examples, retrieval_eval_set
from latentembed.training.steps import hard_negatives
from latentembed.training.tiny import tiny_model, train_tokenizer, vocabulary_texts
from latentembed.training.trainer import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _write_jsonl(path: Path, examples) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            row = {"query": ex.query, "positive": ex.positive, "negatives": ex.negatives}
            if ex.task is not None:
                row["task"] = ex.task
            if ex.instruction is not None:
                row["instruction"] = ex.instruction
            f.write(json.dumps(row) + "\n")
    return path


def _slice(name: str, n: int, seed: int):
    rows = bundled_examples(name)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return [rows[i] for i in order]


def _ndcg_on(model, rows) -> float:
    corpus, queries, qrels = retrieval_eval_set(rows)
    scores = evaluate_retrieval(model, corpus, queries, qrels, k_values=(10,), query_kwargs={"task": "retrieval"})
    return scores["ndcg@10"]


def _model_for(rows) -> EmbeddingModel:
    return tiny_model(train_tokenizer(vocabulary_texts(rows), vocab_size=1024), max_length=96)


@pytest.fixture
def one_thread():
    # The tiny model's ops are too small for intra-op threads; on a busy 2-core machine two
    # threads per process run ~10x slower (the CLI picks one thread for it too).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_lowers_loss_and_improves_retrieval(tmp_path, one_thread):
    seed = _seed()
    rows = _slice("retrieval", 48, seed)
    model = _model_for(rows)
    before = _ndcg_on(model, rows)
    cfg = TrainConfig(
        data=str(_write_jsonl(tmp_path / "train.jsonl", rows)),
        steps=24,
        batch_size=12,
        hard_negatives=2,
        eval=False,
        seed=seed,
        output=str(tmp_path / "out"),
        quiet=True,
        max_length=96,
        full=True,
        lr=2e-3,
    )
    result = train(cfg, model=model)
    losses = [e["loss"] for e in result["loss_history"]]
    assert len(losses) == 24 and all(e["stage"] == 1 for e in result["loss_history"])
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.3 * first, (seed, losses)  # measured: < 0.05
    after = _ndcg_on(model, rows)
    assert after > before + 0.3, (seed, before, after)  # measured: ~0.15 -> ~0.94
    # The saved model reloads and encodes exactly as the trained one.
    loaded = EmbeddingModel.from_pretrained(tmp_path / "out" / "model")
    texts = [rows[0].query, rows[1].positive, ""]
    torch.testing.assert_close(
        loaded.encode(texts, task="retrieval"), model.encode(texts, task="retrieval"), rtol=0, atol=0
    )
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [e["loss"] for e in metrics["loss_history"]] == losses
    assert TrainConfig(**json.loads((tmp_path / "out" / "train_config.json").read_text())).seed == seed


def test_lora_on_a_plain_decoder_trains_only_the_adapters(tmp_path, one_thread):
    pytest.importorskip("transformers")
    from tests.models.embedding_helpers import plain_decoder_dir

    seed = _seed()
    hf_dir = plain_decoder_dir(tmp_path / "hf", family="qwen2", tokenizer="bpe")
    rows = _slice("retrieval", 24, seed)
    result = train(
        TrainConfig(
            data=str(_write_jsonl(tmp_path / "t.jsonl", rows)),
            model=str(hf_dir),
            pooling="mean",
            steps=3,
            batch_size=8,
            lr=1e-3,
            lora_rank=4,
            lora_alpha=8,
            lora_dropout=0.0,
            eval=False,
            seed=seed,
            quiet=True,
            max_length=64,
            output=str(tmp_path / "out"),
        )
    )
    model = result["model"]
    assert model.adapter_names == ("default",) and model.template.name == "e5"  # plain decoder: e5 prompts
    base = EmbeddingModel.from_pretrained(hf_dir, pooling="mean").state_dict()
    trained = model.state_dict()
    shared = [k for k in base if k in trained and isinstance(base[k], torch.Tensor)]
    assert len(shared) >= len([k for k in base if isinstance(base[k], torch.Tensor)]) - 1
    for key in shared:  # the base is frozen
        assert torch.equal(base[key], trained[key]), key
    assert any(k.endswith("lora_b") and trained[k].abs().max() > 0 for k in trained)  # the adapters moved
    # The PEFT directory on the plain checkpoint reproduces the trained model.
    reloaded = EmbeddingModel.from_pretrained(
        hf_dir, pooling="mean", prompt_template="e5", adapters={"default": tmp_path / "out" / "adapters" / "default"}
    )
    texts = [rows[0].query, rows[1].positive]
    torch.testing.assert_close(
        reloaded.encode(texts, task="retrieval"), model.encode(texts, task="retrieval"), rtol=1e-5, atol=1e-6
    )


def test_negatives_are_filled_from_other_rows_positives():
    batch = [
        TrainingExample("q0", "p0", ["n0"]),
        TrainingExample("q1", "p1", []),
        TrainingExample("q2", "p0", ["n2a", "n2b", "n2c"]),
    ]
    negs = hard_negatives(batch, 2)
    assert negs[0] == ["n0", "p1"]  # own negative, then the next row's positive
    assert negs[1] == ["p0", "p0"]  # no own negative: the distinct other positive, repeated to k
    assert negs[2] == ["n2a", "n2b"]  # own negatives first, cut to k
    assert all("p0" not in n for n in (negs[0], negs[2]))  # never the row's own positive text
    assert hard_negatives([TrainingExample("q", "p", ["a", "b"])], 5) == [["a", "b", "a", "b", "a"]]
    # stage 2 never borrows (another row's positive may share the label) and needs own negatives
    assert hard_negatives(batch[::2], 3, borrow=False) == [["n0", "n0", "n0"], ["n2a", "n2b", "n2c"]]
    with pytest.raises(ValueError, match="no hard negative"):
        hard_negatives(batch, 1, borrow=False)


# -- two processes ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, tmp: str, port: int) -> None:
    faulthandler.dump_traceback_later(120, exit=True)
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    log = open(f"{tmp}/stdout{rank}.txt", "w")
    sys.stdout = log
    try:
        cfg = TrainConfig(**json.loads(Path(tmp, "config.json").read_text()))
        result = train(cfg)  # initialises and destroys the process group itself (env://)
        assert not dist.is_initialized()
        torch.save(result["model"].state_dict(), f"{tmp}/rank{rank}.pt")
    finally:
        log.flush()
        faulthandler.cancel_dump_traceback_later()


def _launch(tmp: str, port: int) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(tmp, port), nprocs=WORLD, join=True, start_method="fork")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_gloo_run_equals_one_process_on_the_whole_batch(tmp_path, one_thread):
    seed = _seed()
    rows1, rows2 = _slice("retrieval", 24, seed), _slice("blended", 16, seed)
    model = _model_for(rows1 + rows2)
    model.save_pretrained(tmp_path / "init")
    common = dict(
        data=str(_write_jsonl(tmp_path / "s1.jsonl", rows1)),
        stage2_data=str(_write_jsonl(tmp_path / "s2.jsonl", rows2)),
        model=str(tmp_path / "init"),
        full=True,
        steps=2,
        hard_negatives=1,
        lr=1e-3,
        eval_fraction=0.25,
        seed=seed,
        log_every=1,
        max_length=96,
    )
    Path(tmp_path / "config.json").write_text(json.dumps(dict(common, batch_size=4, output=str(tmp_path / "out"))))
    code = f"from tests.test_training_run import _launch; _launch({str(tmp_path)!r}, {_free_port()})"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for key, value in ranks[0].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, ranks[1][key]), key
    # Only rank 0 logs and saves.
    log = (tmp_path / "stdout0.txt").read_text()
    assert "stage 2 step" in log and "eval after:" in log and "world 2" in log
    assert (tmp_path / "stdout1.txt").read_text() == ""
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "metrics.json",
        "model",
        "train_config.json",
        "train_log.jsonl",
    ]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [(e["stage"], e["step"]) for e in metrics["loss_history"]] == [(1, 1), (1, 2), (2, 1), (2, 2)]

    # One process on the global batch (2 x 4 rows, same shuffle) takes the same steps: the loss
    # gathers the other rank's documents and DDP averages the gradients.
    single = train(TrainConfig(**dict(common, batch_size=8, quiet=True)))
    init = EmbeddingModel.from_pretrained(tmp_path / "init").state_dict()
    for key, value in single["model"].state_dict().items():
        if isinstance(value, torch.Tensor):
            # Equal up to rounding (padding lengths differ), which Adam amplifies on the odd
            # element whose gradient is ~0: compare the updates in norm (measured: ~1e-3).
            update_one, update_ddp = value - init[key], ranks[0][key] - init[key]
            assert (update_ddp - update_one).norm() <= 0.02 * update_one.norm(), key
    losses = [e["loss"] for e in single["loss_history"]]
    assert losses == pytest.approx([e["loss"] for e in metrics["loss_history"]], rel=1e-4)


# -- the command line ------------------------------------------------------------------------------


def test_cli_lora_run_writes_outputs_and_a_reloadable_model(tmp_path):
    seed = _seed()
    data = _write_jsonl(tmp_path / "train.jsonl", _slice("retrieval", 40, seed))
    out = tmp_path / "out"
    argv = [
        "train",
        "--data",
        str(data),
        "--no-full",
        "--lora-rank",
        "4",
        "--lora-alpha",
        "8",
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--eval-fraction",
        "0.25",
        "--output",
        str(out),
        "--seed",
        str(seed),
        "--log-every",
        "1",
        "--max-length",
        "64",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "latentembed", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for needle in ("eval before: nDCG@10", "stage 1 step    3/3 loss", "tok/s", "mem rss max", "eval after:"):
        assert needle in done.stdout, (needle, done.stdout)
    assert "stage 2" not in done.stdout  # --data without --stage2-data: stage 1 only
    assert {p.name for p in out.iterdir()} == {
        "model",
        "adapters",
        "train_config.json",
        "metrics.json",
        "train_log.jsonl",
    }
    assert (out / "adapters" / "default" / "adapter_config.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["loss_history"]) == 3 and {"eval_before", "eval_after"} <= set(metrics)
    assert metrics["trainable_params"] < metrics["total_params"]
    model = EmbeddingModel.from_pretrained(out / "model")
    assert model.adapter_names == ("default",)
    emb = model.encode(["how do I boil an egg", "Eggs boil in ten minutes."], task="retrieval")
    assert emb.shape == (2, 64) and torch.isfinite(emb).all()


def _run_cli(argv, capsys) -> tuple[int, str]:
    code = cli_main(argv)
    return code, capsys.readouterr().err


def test_cli_missing_data_file(tmp_path, capsys):
    code, err = _run_cli(["--data", str(tmp_path / "nope.jsonl")], capsys)
    assert code == 2 and "nope.jsonl" in err and "not found" in err


def test_cli_bad_jsonl_row_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "a", "positive": "b"}\n\n{"query": "c", "positive": 3}\n')
    code, err = _run_cli(["--data", str(path)], capsys)
    assert code == 2 and f"{path}:3" in err and "positive" in err


def test_cli_unknown_task_lists_known_tasks(tmp_path, capsys):
    path = tmp_path / "task.jsonl"
    path.write_text(
        '{"query": "a", "positive": "b", "task": "retrieval"}\n{"query": "c", "positive": "d", "task": "poetry"}\n'
    )
    code, err = _run_cli(["--data", str(path), "--no-eval", "--batch-size", "2"], capsys)
    assert code == 2 and "'poetry'" in err and "example 2" in err and "retrieval" in err and "sts" in err


def test_cli_model_dir_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = _run_cli(["--model", str(tmp_path / "empty"), "--stage2-data", "none"], capsys)
    assert code == 2 and "config.json" in err and "empty" in err


def test_cli_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--batch-size", "0"])
    assert "--batch-size" in capsys.readouterr().err
