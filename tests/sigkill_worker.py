"""The subprocess of test_save_sigkill.py: SIGKILL saves at random instants and classify what survives.

``python -m tests.sigkill_worker SCENARIO ROOT TRIALS SEED`` (SCENARIO: model, decoder or
train_output) imports torch once, builds two different versions ``a`` and ``b`` of what the
scenario saves and records what an unkilled save of each leaves, then runs TRIALS trials:
fork a child that saves the other version over ``ROOT/target``, SIGKILL it after a random delay
(stratified over 0 .. 1.3x one save's duration, so kills land in every phase of the save),
and classify ``ROOT/target``: ``"a"`` or ``"b"`` when it loads and every file equals that
version's reference byte for byte, else ``"neither"`` (with the reason). After the trials one
unkilled save shows whether a killed save's leftovers are cleaned up. Prints one JSON object.

Forking a process that has run torch ops is safe here: one intra-op thread, CPU only, and a
child does file I/O and exits with ``os._exit``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

from latentembed.models.checkpoint import load_decoder, save_decoder
from latentembed.models.decoder import DecoderModel
from latentembed.models.decoder_config import DecoderConfig
from latentembed.models.embedding import EmbeddingModel
from latentembed.models.embedding_config import EmbeddingConfig
from latentembed.tokenization import TextTokenizer
from latentembed.training.config import LIVE_OUTPUT_ENTRIES, TrainConfig
from latentembed.training.output import save_output
from latentembed.training.tiny import tiny_model, train_tokenizer

SIZES = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def _randomize(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()


def _files(path: Path) -> dict:
    """relative path -> sha256 of every file under ``path`` (the exact contents of a save)."""
    out = {}
    for dirpath, _, names in os.walk(path):
        for name in names:
            full = Path(dirpath) / name
            out[str(full.relative_to(path))] = hashlib.sha256(full.read_bytes()).hexdigest()
    return out


def _tensors(module: torch.nn.Module) -> dict:
    return {
        k: hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        for k, v in module.state_dict().items()
        if isinstance(v, torch.Tensor)
    }


def _loaded_model(path: Path) -> dict:
    model = EmbeddingModel.from_pretrained(path)
    return {
        "config": model.config.to_dict(),
        "tensors": _tensors(model),
        "tokenizer": None if model.tokenizer is None else model.tokenizer.tokenizer.to_str(),
    }


# -- the scenarios: two versions, how to save one, what a directory holds ------------------------


def _model_versions() -> dict:
    tok = TextTokenizer(_wordpiece(), bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]")
    cfg = DecoderConfig(vocab_size=4096, **SIZES)
    a = EmbeddingModel(cfg, EmbeddingConfig(pooling="mean", prompt_template="e5"), tokenizer=tok)
    a.add_adapters(["query"], rank=4)
    b = EmbeddingModel(dataclasses.replace(cfg, rms_norm_eps=1e-5), EmbeddingConfig(pooling="mean", normalize=False))
    for m in (a, b):
        _randomize(m)
    return {"a": a, "b": b}


def _wordpiece():
    from tests.tokenizer_helpers import raw_tokenizer

    return raw_tokenizer("wordpiece")


def _decoder_versions() -> dict:
    cfg = DecoderConfig(vocab_size=4096, **SIZES)
    a, b = DecoderModel(cfg), DecoderModel(dataclasses.replace(cfg, rope_theta=500000.0))
    _randomize(a)
    _randomize(b)
    return {"a": (a, 400_000), "b": (b, None)}  # a sharded, b one file


def _train_versions() -> dict:
    tok = train_tokenizer(["a small vocabulary", "for the sigkill trials of train --output"])
    sizes = {k: v for k, v in SIZES.items() if k != "max_position_embeddings"}
    a = tiny_model(tok, **sizes)
    a.add_adapters(["query", "passage"], rank=4)
    b = tiny_model(tok, **sizes)
    _randomize(a)
    _randomize(b)
    metrics = lambda n: {"loss_history": [{"stage": 1, "step": i + 1, "loss": random.random()} for i in range(n)]}  # noqa: E731
    return {
        "a": (a, TrainConfig(seed=1, lora_rank=4), metrics(3), False),
        "b": (b, TrainConfig(seed=2), metrics(5), True),
    }


def _save_model(version, path: Path) -> None:
    version.save_pretrained(path)


def _save_decoder(version, path: Path) -> None:
    model, shard = version
    save_decoder(model, path, max_shard_bytes=shard)


def _save_train(version, path: Path) -> None:
    model, cfg, result, full = version
    save_output(model, dataclasses.replace(cfg, output=str(path)), result, full)


def _state_model(path: Path) -> dict:
    return {"files": _files(path), "loaded": _loaded_model(path)}


def _state_decoder(path: Path) -> dict:
    model = load_decoder(path)
    return {"files": _files(path), "config": model.config.to_hf_dict(), "tensors": _tensors(model)}


def _state_train(path: Path) -> dict:
    # What a run writes while it runs (its log, checkpoints) is that run's, not the final save's.
    files = {k: v for k, v in _files(path).items() if k.split("/")[0] not in LIVE_OUTPUT_ENTRIES}
    return {"files": files, "model": _loaded_model(path / "model")}


def _expected_model(version) -> dict:
    tok = version.tokenizer
    return {
        "config": version.config.to_dict(),
        "tensors": _tensors(version),
        "tokenizer": None if tok is None else tok.tokenizer.to_str(),
    }


SCENARIOS = {
    "model": (_model_versions, _save_model, _state_model, lambda v: {"loaded": _expected_model(v)}),
    "decoder": (
        _decoder_versions,
        _save_decoder,
        _state_decoder,
        lambda v: {"config": v[0].config.to_hf_dict(), "tensors": _tensors(v[0])},
    ),
    "train_output": (_train_versions, _save_train, _state_train, lambda v: {"model": _expected_model(v[0])}),
}


def classify(state_fn, refs: dict, path: Path) -> tuple[str, str]:
    """("a" | "b" | "neither", reason) for the directory ``path``."""
    try:
        state = state_fn(path)
    except Exception as e:  # a directory that does not load is a failed trial, reported
        return "neither", f"does not load: {type(e).__name__}: {e}"[:400]
    for name, ref in refs.items():
        if state == ref:
            return name, ""
    diff = {name: sorted(k for k in ref if state.get(k) != ref[k]) for name, ref in refs.items()}
    files = {name: sorted(set(state["files"]) ^ set(ref["files"])) for name, ref in refs.items()}
    return "neither", f"differs in {diff}; file sets differ by {files}"


def _leftovers(root: Path) -> list:
    return sorted(n for n in os.listdir(root) if n.startswith(".target."))


def _child_save(save, version, target: Path, kill_after) -> tuple[int, float]:
    """Fork a child that saves ``version`` to ``target``; SIGKILL it ``kill_after`` seconds after
    its save started (None: let it finish). Returns (wait status, seconds from start to exit)."""
    started_r, started_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one save, nothing else
        code = 0
        try:
            os.write(started_w, b"1")
            save(version, target)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(started_w)
    os.read(started_r, 1)  # the delay counts from the save's start, not from the fork
    os.close(started_r)
    t0 = time.perf_counter()
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)  # a child that already finished is a zombie: the kill is a no-op
    _, status = os.waitpid(pid, 0)
    return status, time.perf_counter() - t0


def run(scenario: str, root: Path, trials: int, seed: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    make, save, state_fn, expected_fn = SCENARIOS[scenario]
    versions = make()
    target = root / "target"
    refs = {}
    for name, version in versions.items():  # at the target's path: train_config.json names it
        save(version, target)
        refs[name] = state_fn(target)
        sub = {k: refs[name][k] for k in expected_fn(version)}
        assert sub == expected_fn(version), f"version {name} does not load as the model saved"
    current = "b"
    # One save's duration as the trials see it: in a forked child (copy-on-write page faults,
    # cleaning up the previous save's leftovers), from its start to its exit.
    durations = []
    for _ in range(3):
        current = "b" if current == "a" else "a"
        durations.append(_child_save(save, versions[current], target, kill_after=None)[1])
    duration = sorted(durations)[1]
    out = {"save_s": duration, "trials": []}
    for i in range(trials):
        new = "b" if current == "a" else "a"
        delay = (i + rng.random()) / trials * 1.3 * duration
        status, _ = _child_save(save, versions[new], target, kill_after=delay)
        killed = os.WIFSIGNALED(status)
        leftovers = _leftovers(root)
        state, reason = classify(state_fn, refs, target)
        out["trials"].append(
            {
                "delay_s": delay,
                "killed": killed,
                "exit": None if killed else os.WEXITSTATUS(status),
                "old": current,
                "new": new,
                "state": state,
                "reason": reason,
                "leftovers": leftovers,
            }
        )
        if state == "neither":
            break  # what the next trial replaces is unknown
        current = state
    # Recovery: the next save (unkilled) removes what the killed ones left.
    save(versions["b" if current == "a" else "a"], target)
    out["final_leftovers"] = _leftovers(root)
    out["final_state"] = classify(state_fn, refs, target)[0]
    out["final_expected"] = "b" if current == "a" else "a"
    return out


if __name__ == "__main__":
    scenario, root, trials, seed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(run(scenario, root, trials, seed)))
