"""``train --fsdp`` (FSDP2, gloo on CPU): N sharded ranks take the same steps as one process on
the whole global batch: the same losses and updated weights within fp32 reduction-order
rounding, with and without GradCache and gradient checkpointing, full fine-tuning and LoRA
with the latent-attention head and per-row multi-LoRA routing; every rank holds about 1/N of
the weights; the saved ``model/`` is the whole model.

The ranks are forked from a fresh launcher process (forking the test process itself can
deadlock, see tests/test_training_run.py), one thread each.
"""

import dataclasses
import faulthandler
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from latentembed.models.decoder_config import DecoderConfig
from latentembed.models.embedding import EmbeddingModel
from latentembed.models.embedding_config import EmbeddingConfig
from latentembed.training.tiny import TINY, train_tokenizer, vocabulary_texts
from latentembed.training.trainer import TrainConfig, train
from tests.test_training_run import _free_port, _slice, _write_jsonl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _worker(rank: int, tmp: str, port: int, world: int) -> None:
    faulthandler.dump_traceback_later(120, exit=True)
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    sys.stdout = open(f"{tmp}/stdout{rank}.txt", "w")
    try:
        cfg = TrainConfig(**json.loads(Path(tmp, "config.json").read_text()))
        model = train(cfg)["model"]
        from torch.distributed.tensor import DTensor

        params = list(model.parameters())
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
        sharded = all(isinstance(p, DTensor) for p in params)
        Path(tmp, f"shard{rank}.json").write_text(json.dumps({"local": local, "sharded": sharded}))
    finally:
        sys.stdout.flush()
        faulthandler.cancel_dump_traceback_later()


def launch(tmp: str, port: int, world: int) -> None:
    """Run ``train(TrainConfig(**tmp/config.json))`` on ``world`` forked gloo ranks."""
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(tmp, port, world), nprocs=world, join=True, start_method="fork")


def _cli_worker(rank: int, world: int, port: int, argv: list) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from latentembed.training.cli import main

    code = main(argv)
    if code:
        raise SystemExit(code)


def launch_cli(world: int, argv: list) -> None:
    """``python -m latentembed train ARGV`` on ``world`` gloo ranks forked from this process:
    what torchrun runs, without importing torch once per rank (seconds each on a 2-core CI
    machine)."""
    import torch.multiprocessing as mp

    import latentembed.training.trainer  # noqa: F401  (imported once, before the fork)

    mp.start_processes(_cli_worker, args=(world, _free_port(), argv), nprocs=world, join=True, start_method="fork")


def run_ranks(tmp: Path, config: dict, world: int) -> None:
    """``config`` trained by ``world`` ranks from a fresh launcher process."""
    (tmp / "config.json").write_text(json.dumps(config))
    code = f"from tests.test_training_fsdp import launch; launch({str(tmp)!r}, {_free_port()}, {world})"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def _model(rows, *, latent: bool, template: str) -> EmbeddingModel:
    tokenizer = train_tokenizer(vocabulary_texts(rows, template), vocab_size=1024)
    decoder = DecoderConfig(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id, **TINY)
    pooling = dict(pooling="latent_attention", latent_attention=dict(num_latents=8, num_heads=2, dim_head=16))
    config = EmbeddingConfig(**(pooling if latent else dict(pooling="mean")), prompt_template=template, max_length=64)
    return EmbeddingModel(decoder, config, tokenizer=tokenizer)


CASES = {
    # name: (world, trainer settings)
    "full-w2-gradcache-checkpointing": (2, dict(full=True, grad_cache=5, grad_checkpointing=True)),
    "full-w4": (4, dict(full=True, learnable_temperature=True)),
    # LoRA on every projection, two adapters routed per row (jina-v3: queries and passages), the
    # latent-attention head trained fully; no LoRA dropout (each rank draws its own masks).
    "lora-latent-multilora-w2": (
        2,
        dict(
            full=False,
            lora_rank=4,
            lora_dropout=0.0,
            template="jina-v3",
            default_task="retrieval.query",
            doc_task="retrieval.passage",
        ),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_ranks_equal_one_process_on_the_whole_batch(tmp_path, case):
    world, settings = CASES[case]
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    rows = _slice("retrieval", 8 * world + 8, seed)
    if "template" in settings:  # the rows' task in that template's names
        rows = [dataclasses.replace(ex, task=settings["default_task"]) for ex in rows]
    torch.manual_seed(seed)
    init = _model(rows, latent=case.startswith("lora"), template=settings.get("template", "e5"))
    init.save_pretrained(tmp_path / "init")
    common = dict(
        data=str(_write_jsonl(tmp_path / "s1.jsonl", rows)),
        stage2_data="none",
        model=str(tmp_path / "init"),
        steps=2,
        hard_negatives=1,
        lr=1e-3,
        eval_fraction=0.2,
        seed=seed,
        log_every=1,
        max_length=48,
        **settings,
    )
    run_ranks(tmp_path, dict(common, batch_size=4, fsdp=True, output=str(tmp_path / "out")), world)

    torch.set_num_threads(1)
    single = train(TrainConfig(**dict(common, batch_size=4 * world, quiet=True)))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "world 2" in (tmp_path / "stdout0.txt").read_text() or world != 2
    # The same losses (the loss gathers every rank's documents) ...
    losses = [e["loss"] for e in metrics["loss_history"]]
    assert losses == pytest.approx([e["loss"] for e in single["loss_history"]], rel=2e-5, abs=1e-6), case
    assert "ndcg@10" in metrics["eval_after"]  # every rank ran the evaluation's forwards
    # ... and the same updates: compared in norm, tensor by tensor (reduction order differs;
    # Adam amplifies it on elements whose gradient is ~0; measured <= 5e-4 over seeds).
    got = load_file(str(tmp_path / "out" / "model" / "model.safetensors"))
    before = init.state_dict()
    after = single["model"].state_dict()
    assert got.keys() == {k for k in after if k in got} and len(got) > 0
    changed = 0
    for name, value in got.items():
        if name not in before:  # adapters, added by the trainer: bound by Adam's largest update (lr a step)
            bound = common["lr"] * common["steps"] * value.numel() ** 0.5
            assert (value - after[name]).norm() <= 5e-3 * bound, (case, name, seed)
            continue
        update_one, update_fsdp = after[name] - before[name], value - before[name]
        if update_one.norm() > 0:
            changed += 1
            assert (update_fsdp - update_one).norm() <= 5e-3 * update_one.norm(), (case, name, seed)
        else:
            assert update_fsdp.norm() == 0, (case, name)
    assert changed > 0
    # Every rank held its shard only: about 1/world of the weights (shards round up).
    params = list(single["model"].parameters())
    total = sum(p.numel() for p in params)
    for rank in range(world):
        shard = json.loads((tmp_path / f"shard{rank}.json").read_text())
        assert shard["sharded"], rank
        assert shard["local"] <= total / world + 64 * len(params), (rank, shard["local"], total)
    # The saved directory is a whole, loadable model equal to what was written.
    reloaded = EmbeddingModel.from_pretrained(tmp_path / "out" / "model")
    for name, tensor in reloaded.state_dict().items():
        if name in got:
            assert torch.equal(tensor, got[name]), name
    if not settings["full"]:
        assert sorted(p.name for p in (tmp_path / "out" / "adapters").iterdir()) == [
            "retrieval.passage",
            "retrieval.query",
        ]
