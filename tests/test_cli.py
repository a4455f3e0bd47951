"""`python -m latentembed info|bench` as a user runs them, in a subprocess."""

import json
import subprocess
import sys

import pytest


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "latentembed", *args], capture_output=True, text=True, timeout=600)


def test_info_reports_versions_and_auto_backends():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    import torch

    assert f"torch         {torch.__version__}" in result.stdout
    assert "extension     latentembed._C" in result.stdout
    expected = "cuda" if torch.cuda.is_available() else "reference"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert any(
        line.split()[:2] == ["masked_mean_pool", device] and line.split()[-1] in (expected, "triton")
        for line in result.stdout.splitlines()
    ), result.stdout


def test_bench_writes_table_and_json(tmp_path):
    path = tmp_path / "bench.json"
    result = run_cli("bench", "--op", "masked_mean_pool", "--impl", "reference", "--device", "cpu", "--json", str(path))
    assert result.returncode == 0, result.stderr
    assert "measured copy bandwidth" in result.stdout and "median ms" in result.stdout
    payload = json.loads(path.read_text())
    assert payload["environment"]["torch"]
    rows = payload["results"]
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert {r["case"].split()[0] for r in rows} == {"padded", "packed"}
    assert all(r["median_ms"] > 0 and r["gbps"] > 0 for r in rows)


@pytest.mark.parametrize(
    "args, message", [(["bench", "--op", "nope"], "unknown op"), (["frobnicate"], "invalid choice")]
)
def test_cli_rejects_bad_arguments(args, message):
    result = run_cli(*args)
    assert result.returncode != 0
    assert message in result.stderr
