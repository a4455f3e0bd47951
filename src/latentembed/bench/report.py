"""One JSON of the GPU check: every target met, MISSED, not measured or not run, with the numbers.

``scripts/gpu_check.sh`` records each phase (install, tests, bench) in ``OUT/phases.jsonl`` as it
ends and calls ``python -m latentembed.bench.report OUT`` last, and from its exit trap when a
phase fails or the call is cut short, so that ``OUT/gpu_check.json`` always exists and says how
far the run got. The targets come from the benchmark summaries' ``target ...`` lines
(:func:`parse_targets`, also stored in ``bench.json``); a target whose benchmark never ran is
listed as "not run", so the JSON always has every target of docs/gpu.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

from ..atomic_io import atomic_write_json

# Every target of docs/gpu.md ("Targets"), as the start of the summary line that states it.
EXPECTED_TARGETS = {
    "masked_mean_pool": ["padded fwd <= 0.1 ms", "padded fwd+bwd <= 0.22 ms", "packed <= padded per real token"],
    "latent_attention_pooling": [
        "fwd <= 2.6 ms",
        "fwd+bwd <= 8.0 ms",
        "peak memory fwd <= 50%",
        "peak memory fwd+bwd <= 50%",
    ],
    "infonce_lse": ["fwd+bwd <= 3.4 ms", "extra peak memory <= 200 MiB", "128k x 512k runs"],
    "multi_lora": [
        "mixed fwd / single-adapter fwd <=",
        "mixed fwd+bwd / single-adapter fwd+bwd <=",
        "single-adapter fwd overhead over base (ours-single) <=",
    ],
    "decoder": ["fwd >= 3.0x transformers", "fwd+bwd >= 2.0x transformers"],
}
_NUMBER = re.compile(r"(-?\d+(?:\.\d+)?)\s*(ms|MiB|x|%)")


def parse_targets(op: str, summary: str) -> list:
    """The ``target ...`` lines of one benchmark's summary as dicts: op, target (the line's
    statement before the numbers), verdict (``met``, ``MISSED``, ``not measured``), the first
    measured number and its unit, and the whole line."""
    found = []
    for line in summary.splitlines():
        line = line.strip()
        if not line.startswith("target "):
            continue
        text = line[len("target ") :]
        if text.endswith("-> met"):
            verdict = "met"
        elif text.endswith("-> MISSED"):
            verdict = "MISSED"
        else:
            verdict = "not measured"
        statement = text.split(":", 1)[0]
        numbers = _NUMBER.findall(text[len(statement) :])
        value, unit = (float(numbers[0][0]), numbers[0][1]) if numbers else (None, None)
        found.append({"op": op, "target": statement, "verdict": verdict, "value": value, "unit": unit, "line": line})
    return found


def complete_targets(measured: list, ops_run: Optional[list] = None) -> list:
    """``measured`` plus one "not run" entry for every expected target no summary stated."""
    out = list(measured)
    for op, expected in EXPECTED_TARGETS.items():
        for statement in expected:
            if any(t["op"] == op and t["target"].startswith(statement.rstrip(" <=")) for t in measured):
                continue
            ran = bool(ops_run) and op in ops_run
            verdict, why = ("not measured", "its benchmark ran; no summary line") if ran else ("not run", "")
            out.append(
                {"op": op, "target": statement, "verdict": verdict, "value": None, "unit": None, "line": why or verdict}
            )
    return out


def _test_counts(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:  # cut short while writing
        return {"error": f"unreadable JUnit XML: {e}"}
    suites = root.iter("testsuite")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = failed[:100]
    return counts


def build_report(out: Path, mode: str = "quick", final: bool = False, phases_run: Optional[list] = None) -> dict:
    """The summary of the run in ``out`` (see the module docstring). ``final``: the script ended;
    it is "complete" when every phase of ``phases_run`` (default install, tests, bench) ended well."""
    from .model import all_models

    phases = []
    log = out / "phases.jsonl"
    if log.exists():
        for line in log.read_text().splitlines():
            if line.strip():
                try:
                    phases.append(json.loads(line))
                except json.JSONDecodeError:
                    phases.append({"phase": "?", "status": "unreadable", "detail": line[:200]})
    bench = {}
    bench_path = out / "bench.json"
    if bench_path.exists():
        try:
            bench = json.loads(bench_path.read_text())
        except json.JSONDecodeError as e:
            bench = {"error": f"unreadable bench.json: {e}"}
    measured = bench.get("targets", [])
    ops_run = sorted({r["op"] for r in bench.get("results", [])})
    # failed: a phase failed or timed out; partial: cut short (interrupted, skipped for lack of
    # time, or not final yet); complete: every requested phase ended well.
    failed = [p for p in phases if p.get("status") in ("failed", "timeout", "unreadable")]
    expected_phases = set(phases_run or ("install", "tests", "bench"))
    done = {p.get("phase") for p in phases if p.get("status") == "ok"}
    status = "failed" if failed else ("complete" if final and expected_phases <= done else "partial")
    targets = complete_targets(measured, ops_run)
    return {
        "status": status,
        "mode": mode,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": bench.get("environment"),
        "phases": phases,
        "tests": _test_counts(out / "tests.xml"),
        "targets": targets,
        "targets_met": sum(t["verdict"] == "met" for t in targets),
        "targets_missed": sum(t["verdict"] == "MISSED" for t in targets),
        "model": bench.get("model") or [m.as_dict() for m in all_models()],
        "kernels": bench.get("kernels", []),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="write OUT/gpu_check.json from what the GPU check left in OUT")
    parser.add_argument("out", help="the GPU check's output folder")
    parser.add_argument("--mode", default="quick", help="quick, full or dry-run (recorded as is)")
    parser.add_argument("--final", action="store_true", help="the last call: every phase should have ended")
    parser.add_argument("--phases", help="the phases the run was asked for (space-separated)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    report = build_report(out, args.mode, args.final, args.phases.split() if args.phases else None)
    atomic_write_json(out / "gpu_check.json", report)
    met, missed = report["targets_met"], report["targets_missed"]
    print(f"gpu_check.json: status {report['status']}, targets met {met}, MISSED {missed}, of {len(report['targets'])}")
    for t in report["targets"]:
        print(f"  {t['verdict']:<12} {t['op']}: {t['target']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
