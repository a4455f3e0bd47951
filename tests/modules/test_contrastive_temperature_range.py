"""infonce_loss and InfoNCELoss reject temperatures whose 1 / temperature the loss's compute
dtype cannot hold (it used to check in float64 and compute in float32: NaN or inf losses)."""

import pytest
import torch

from latentembed.modules.contrastive import InfoNCELoss, infonce_loss

F32_RANGE = r"temperature must lie in \[2.94e-39, 8.51e\+37\]"


def _batch(dtype=torch.float32):
    return torch.randn(4, 8, dtype=dtype), torch.randn(12, 8, dtype=dtype)


CASES = [(kind, t) for kind in ("float", "float64-tensor") for t in (1e-40, 1e39, 1e-320)] + [
    ("float32-tensor", 1e-40),  # a subnormal float32: its float32 reciprocal is inf
    ("float32-tensor", 1e38),  # 1 / temperature = 1e-38: a subnormal float32
]


@pytest.mark.parametrize("kind, temperature", CASES, ids=[f"{k}-{t:g}" for k, t in CASES])
def test_infonce_loss_rejects_temperatures_float32_cannot_invert(kind, temperature):
    q, d = _batch()
    t = temperature if kind == "float" else torch.tensor(temperature, dtype=getattr(torch, kind.split("-")[0]))
    with pytest.raises(ValueError, match=F32_RANGE):
        infonce_loss(q, d, temperature=t)


def test_float64_losses_take_float64_scales():
    q, d = _batch(torch.float64)
    for t in (1e-40, torch.tensor(1e-40, dtype=torch.float64)):
        loss = infonce_loss(q, d, temperature=t)
        assert torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"temperature must lie in \[5.56e-309, 4.49e\+307\]"):
        infonce_loss(q, d, temperature=1e308)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=1e-40), F32_RANGE),
        (dict(temperature=1e39), F32_RANGE),
        (dict(temperature=0.05, learnable_temperature=True, temperature_range=(1e-40, 1.0)), "temperature_range"),
        (dict(temperature=0.05, learnable_temperature=True, temperature_range=(0.01, 1e39)), "temperature_range"),
        (dict(temperature=0.05, temperature_range=(1e-40, 1.0)), "temperature_range"),
    ],
    ids=["fixed-small", "fixed-large", "range-min", "range-max", "range-min-fixed"],
)
def test_module_rejects_temperatures_float32_cannot_invert(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InfoNCELoss(**kwargs)


def test_module_extreme_but_valid_bounds_give_finite_losses():
    # The widest range float32 can hold: clamped at either end the loss stays finite.
    loss_fn = InfoNCELoss(0.05, learnable_temperature=True, temperature_range=(3e-39, 8e37))
    q, d = _batch()
    for log_scale in (1e4, -1e4):  # far outside: clamped to the bounds
        with torch.no_grad():
            loss_fn.log_scale.fill_(log_scale)
        scale = loss_fn.scale()
        assert torch.isfinite(scale) and scale > 0
        assert torch.isfinite(loss_fn(q * 1e-37, d) if log_scale > 0 else loss_fn(q, d))
