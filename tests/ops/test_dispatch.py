"""Backend selection: auto, explicit, environment override and the reasons given on failure."""

import pytest
import torch

from latentembed import BackendUnavailableError, masked_mean_pool
from latentembed.ops import OPS
from latentembed.ops.dispatch import ENV_VAR, select_backend

BACKENDS = OPS["masked_mean_pool"]


def test_auto_on_cpu_picks_reference_not_the_interpreter():
    chosen = select_backend("masked_mean_pool", BACKENDS, "auto", torch.device("cpu"), torch.float32)
    assert chosen.name == "reference"


@pytest.mark.gpu
def test_auto_on_gpu_picks_a_kernel():
    chosen = select_backend("masked_mean_pool", BACKENDS, "auto", torch.device("cuda"), torch.bfloat16)
    assert chosen.name in ("cuda", "triton")


def test_explicit_backend_that_cannot_run_lists_why():
    with pytest.raises(BackendUnavailableError, match=r"cuda: runs on \['cuda'\], got device 'cpu'"):
        masked_mean_pool(torch.randn(2, 3, 4), backend="cuda")
    with pytest.raises(BackendUnavailableError, match=r"triton: supports dtypes .*got float64"):
        masked_mean_pool(torch.randn(2, 3, 4, dtype=torch.float64), backend="triton")


def test_auto_failure_lists_every_backend():
    with pytest.raises(BackendUnavailableError) as info:
        select_backend("masked_mean_pool", BACKENDS, "auto", torch.device("meta"), torch.float32)
    message = str(info.value)
    for name in ("cuda", "triton", "reference"):
        assert f"{name}: " in message


def test_environment_variable_replaces_auto(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(BackendUnavailableError, match="backend='cuda'"):
        masked_mean_pool(torch.randn(2, 3, 4))
    # An explicit argument still wins over the environment.
    assert masked_mean_pool(torch.randn(2, 3, 4), backend="reference").shape == (2, 4)
    monkeypatch.setenv(ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=f"environment variable {ENV_VAR} must be one of"):
        masked_mean_pool(torch.randn(2, 3, 4))


def test_float64_runs_on_reference_only():
    hidden = torch.randn(2, 3, 4, dtype=torch.float64)
    assert masked_mean_pool(hidden).dtype == torch.float64
