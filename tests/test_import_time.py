"""`import latentembed` stays light: it must not pull in torch._dynamo (about 0.9 s on CPU, via
an import-time ``torch.compiler.disable``), triton, or the optional anchors (transformers,
sentence-transformers, peft). Measured in a fresh interpreter."""

import subprocess
import sys

HEAVY = ("torch._dynamo", "triton", "sympy", "transformers", "sentence_transformers", "peft")


def test_import_pulls_in_no_heavy_module():
    code = f"import sys, latentembed; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import latentembed imported {out.stdout.strip()}"
