"""Shared test setup: Triton's interpreter on CPU, NaN-filled allocations, GPU markers."""

import os
import zlib

import torch

# Triton reads TRITON_INTERPRET when it is first imported; torch does not import it, so setting
# it here (before any test module imports latentembed's kernels) runs every Triton kernel on
# CPU tensors in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from latentembed._extension import extension_unavailable  # noqa: E402

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    ext_reason = extension_unavailable() if HAS_GPU else "needs a CUDA GPU; this machine has none"
    no_ext = pytest.mark.skip(reason=ext_reason or "")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(no_gpu)
        if "cuda_ext" in item.keywords and ext_reason is not None:
            item.add_marker(no_ext)


@pytest.fixture(autouse=True)
def fill_new_tensors_with_nan():
    """Fresh allocations (torch.empty here and at::empty in C++) come back NaN-filled, so an
    output element a kernel forgets to write fails the comparison instead of passing by luck."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = was_fill
    torch.use_deterministic_algorithms(was_on, warn_only=was_warn)


# Fresh random data on every run; the run's seed is printed in the header so a failure can be
# replayed with LATENTEMBED_TEST_SEED=<seed>.
SESSION_SEED = int(os.environ.get("LATENTEMBED_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    return (
        f"latentembed: LATENTEMBED_TEST_SEED={SESSION_SEED}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
    )


@pytest.fixture(autouse=True)
def fresh_seed(request):
    torch.manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))
