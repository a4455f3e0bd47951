"""scripts/gpu_check.sh's control flow on CPU (--dry-run: every phase a stub), and the JSON it
always leaves: every target, the phases, partial results after a failure, a timeout, an
exhausted budget or a kill. The GPU run itself is the script without --dry-run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
N_TARGETS = 15

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="a bash script")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "OUT"}
    env.update(PYTHON=sys.executable, GPU_CHECK_RESERVE_S="5", **extra)
    # The package as these tests import it (a source checkout or an installed copy).
    import latentembed

    env["PYTHONPATH"] = str(Path(latentembed.__file__).parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(out, *args, **env):
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", *args, str(out)],
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=300,
    )
    return proc, json.loads((out / "gpu_check.json").read_text())


def _phases(report):
    return {p["phase"]: p["status"] for p in report["phases"]}


def test_dry_run_writes_one_json_with_every_target(tmp_path):
    proc, report = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["status"] == "complete" and report["mode"] == "dry-run"
    assert _phases(report) == {"env": "ok", "install": "ok", "tests": "ok", "bench": "ok"}
    assert len(report["targets"]) == N_TARGETS
    assert {t["verdict"] for t in report["targets"]} == {"not run"}
    assert {m["op"] for m in report["model"]} >= {"infonce_lse", "latent_attention_pooling", "masked_mean_pool"}
    # The device tool brings back at most 8 files; the phase log lives on inside the JSON.
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and "phases.jsonl" not in files, files


def test_failed_tests_still_run_the_benchmarks(tmp_path):
    proc, report = _run(tmp_path, GPU_CHECK_FAIL="tests")
    assert proc.returncode == 1
    assert _phases(report) == {"env": "ok", "install": "ok", "tests": "failed", "bench": "ok"}
    assert report["status"] == "failed"


def test_failed_install_stops_and_still_reports(tmp_path):
    proc, report = _run(tmp_path, GPU_CHECK_FAIL="install")
    assert proc.returncode == 1
    assert _phases(report) == {"env": "ok", "install": "failed"}
    assert report["status"] == "failed" and len(report["targets"]) == N_TARGETS


def test_phase_limits_and_the_budget(tmp_path):
    # Budget 26 s, 5 s kept in reserve: env (a 3 s stub) fits; install is cut at the 18 s left;
    # nothing is left for tests and bench, which are recorded as skipped.
    proc, report = _run(tmp_path, GPU_CHECK_BUDGET_S="26", GPU_CHECK_STUB_SECONDS="3")
    assert proc.returncode == 1
    assert _phases(report)["env"] == "ok"
    assert set(_phases(report).values()) <= {"ok", "timeout", "skipped"}
    assert "skipped" in _phases(report).values()


def test_killed_run_leaves_a_partial_report(tmp_path):
    env = _env(GPU_CHECK_STUB_SECONDS="30", GPU_CHECK_PHASES="env install")
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "--dry-run", str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (tmp_path / "env.txt").exists():  # the env phase began
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["status"] == "partial"
    assert _phases(report) == {"env": "interrupted"}


def test_help_and_bad_options():
    assert subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True).returncode == 0
    bad = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --gpu" in bad.stderr
