"""Linearization precision: float64 by default everywhere; float32 only behind a measured round-off floor.

The defect (issue 12): at a probe step whose LR factor is 0.01 or 0.001 (warmup, end of a decay),
‖nl‖ ∝ factor² sinks below float32 round-off and the α = ½ depth slope of lin_ratio turns positive.
Float32 round-off is the same on a CPU as on a GPU, so it is reproduced here by asking for float32.
"""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import xarray as xr
from torch.func import functional_call, jvp

from probes.adapters import GPTAdapter
from probes.linearization import branch_linearization
from probes.probe_log import ProbeLog
from probes.recorder import ProbeConfig, ProbeRecorder
from probes.schema import BRANCHES, LIN_FLOOR_MULTIPLE
from probes.session import ProbeSession
from tests.probes.conftest import tiny_spec
from trainer.loop import RunSpec, TrainConfig, Trainer
from trainer.model import GPT, ModelConfig
from trainer.optim import set_lr
from trainer.parameterization import Parameterization

FACTORS = (1.0, 0.01, 0.001)
DEPTHS = (2, 16)


def _probe_step(depth: int, tmp_path) -> dict:
    """α = ½, width 64: three training steps, then one real AdamW step at each LR factor from the same
    state; per factor, the branches' LinearizationResults in float64, float32 and unguarded float32."""
    param = Parameterization(name="alpha", alpha=0.5, width=64, depth=depth, base_width=256, lr_base=2**-10)
    spec = RunSpec(param=param, model=ModelConfig(seq_len=32),
                   train=TrainConfig(steps=10, batch_size=4, warmup_frac=0.0, schedule="constant"))
    trainer = Trainer(spec, tmp_path / f"d{depth}", quiet=True)
    for step in range(3):
        trainer.train_step(step)
    model, optimizer = trainer.model, trainer.optimizer
    session = ProbeSession(GPTAdapter(model), trainer.data.probe_batch(2), lin_batch_size=1)
    batch = trainer.data.train_batch(0, 3, 4)
    model(batch[:, :-1], batch[:, 1:]).backward()
    session.before_update(3)
    pending = session._pending
    model_state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    out = {}
    for factor in FACTORS:
        set_lr(optimizer, factor)
        optimizer.step()  # the real update at this LR factor
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        for mode in ("float64", "float32"):
            session.dtype = getattr(torch, mode)
            out[(factor, mode)] = session.linearization(pending["acts"], pending["before"], after)
        model.load_state_dict(model_state)
        optimizer.load_state_dict(copy.deepcopy(opt_state))  # loading aliases the tensors it is given
    return out


@pytest.fixture(scope="module")
def probe_steps(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("precision")
    return {depth: _probe_step(depth, tmp) for depth in DEPTHS}


def _slope(results: dict, factor: float, mode: str, branch: str, raw: bool = False) -> float:
    """Depth 2 → 16 log-log slope of the layer-geometric-mean lin_ratio (NaN if any value is NaN)."""
    means = []
    for depth in DEPTHS:
        lin = results[depth][(factor, mode)]
        ratios = [float((r.nonlin_norm_raw if raw else r.nonlin_norm) / r.lin_norm)
                  for (layer, b), r in lin.items() if b == branch]
        means.append(np.mean(np.log(ratios)))
    return (means[1] - means[0]) / math.log(DEPTHS[1] / DEPTHS[0])


@pytest.mark.parametrize("branch", BRANCHES)
def test_float64_slope_is_the_same_at_small_lr_factors(probe_steps, branch):
    # Independent check: nl/lin is first order in the update, so every ratio scales with the LR factor
    # and the slope vs depth does not depend on it. Theory for α = ½: about −0.5.
    reference = _slope(probe_steps, 1.0, "float64", branch)
    assert -0.8 < reference < -0.3, reference
    for factor in FACTORS[1:]:
        assert abs(_slope(probe_steps, factor, "float64", branch) - reference) < 0.02


@pytest.mark.parametrize("branch", BRANCHES)
def test_unguarded_float32_flips_the_slope_at_small_lr_factors(probe_steps, branch):
    # The defect itself, so that the tests below can fail on it: without the floor, float32 reports
    # round-off, which does not shrink with depth the way ‖nl‖ does: the lazy slope is pulled towards
    # 0 at an LR factor of 0.01 and turns positive (a lazy model would read as complete) at 0.001.
    at_001 = _slope(probe_steps, 0.01, "float32", branch, raw=True)
    assert at_001 - _slope(probe_steps, 0.01, "float64", branch) > 0.25, at_001
    assert _slope(probe_steps, 0.001, "float32", branch, raw=True) > 0


def test_float32_values_equal_float64_or_are_flagged(probe_steps):
    seen = {factor: [0, 0] for factor in FACTORS}  # (kept, flagged)
    for depth in DEPTHS:
        for factor in FACTORS:
            exact, single = probe_steps[depth][(factor, "float64")], probe_steps[depth][(factor, "float32")]
            for key, r in single.items():
                assert not bool(exact[key].below_floor) and math.isnan(float(exact[key].nonlin_floor))
                if bool(r.below_floor):
                    assert all(math.isnan(float(v)) for v in (r.nonlin_norm, r.lin_ratio, r.nonlin_to_output))
                    assert float(r.nonlin_norm_raw) < LIN_FLOOR_MULTIPLE * float(r.nonlin_floor)
                    seen[factor][1] += 1
                else:  # round-off ≤ a tenth of the value: the ratio is float64's within 10%
                    assert abs(math.log(float(r.lin_ratio) / float(exact[key].lin_ratio))) < 0.1, (depth, key)
                    seen[factor][0] += 1
    assert seen[1.0][1] == 0  # at the peak LR float32 is fine and nothing is thrown away
    assert seen[0.001][0] == 0  # at 0.001 of it, float32 can measure nothing here: all flagged
    for branch in BRANCHES:  # where nothing is flagged, the slope is float64's
        assert abs(_slope(probe_steps, 1.0, "float32", branch) - _slope(probe_steps, 1.0, "float64", branch)) < 0.01


def _nl_vector(branch, h, before, after, dtype) -> torch.Tensor:
    """F(θ+Δθ) − F(θ) − JΔθ itself (not its norm), evaluated in `dtype`, returned in float64."""
    p = {k: v.to(dtype) for k, v in before.items()}
    d = {k: after[k].to(dtype) - p[k] for k in p}

    def f(q):
        return functional_call(branch, q, (h.to(dtype),))

    with torch.no_grad():
        out, lin = jvp(f, (p,), (d,))
        return (f({k: p[k] + d[k] for k in p}) - out - lin).double()


def test_floor_matches_the_actual_float32_error_of_nl():
    """The measured floor against the float32 error of the nl *vector*, computed directly in both dtypes."""
    torch.manual_seed(0)
    param = Parameterization(name="alpha", alpha=0.5, width=64, depth=2, base_width=256)
    gpt = GPT(param, ModelConfig(seq_len=32))
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(1, 32, 64, generator=gen)
    for name in ("attn_branch", "mlp_branch"):
        branch = getattr(gpt.blocks[1], name)
        before = {k: v.detach() for k, v in branch.named_parameters()}
        after = {k: (v + 1e-5 * torch.randn(v.shape, generator=gen)).float() for k, v in before.items()}
        with gpt.attention_backend("math"):
            exact = _nl_vector(branch, h, before, after, torch.float64)
            actual = float((_nl_vector(branch, h, before, after, torch.float32) - exact).norm())
            r = branch_linearization(branch, h, before, after, dtype=torch.float32)
        assert 0.5 < float(r.nonlin_floor) / actual < 2, (name, float(r.nonlin_floor), actual)
        assert bool(r.below_floor)  # a 1e-5 update: ‖nl‖ ~ 1e-10 ‖F‖, nothing float32 can see


def test_default_precision_is_float64_on_every_device(tmp_path):
    assert ProbeConfig().dtype == "float64"
    spec = tiny_spec(steps=2)
    trainer = Trainer(spec, tmp_path, quiet=True)
    log = ProbeLog(GPTAdapter(trainer.model), trainer.data.probe_batch(2), tmp_path)
    assert log.session.dtype == torch.float64 and log.attrs["probe_dtype"] == "float64"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_store_flags_what_it_cannot_measure(tmp_path, dtype):
    # A base LR of 2^-24 makes every update tiny: float32 must flag every value, float64 none.
    spec = tiny_spec(steps=3)
    spec = dataclasses.replace(spec, param=dataclasses.replace(spec.param, lr_base=2**-24))
    recorder = ProbeRecorder(ProbeConfig(every=1, batch_size=2, dtype=dtype), tmp_path, spec)
    Trainer(spec, tmp_path, observers=[recorder], quiet=True).run()
    ds = xr.open_zarr(tmp_path / "probes.zarr").load()
    assert ds.attrs["probe_dtype"] == dtype
    flags, floor = ds.lin_below_floor.values, ds.nonlin_floor.values
    if dtype == "float64":
        assert np.all(flags == 0) and np.all(np.isnan(floor))
        assert np.all(np.isfinite(ds.lin_ratio.values)) and np.all(ds.lin_ratio.values > 0)
    else:
        assert np.all(flags == 1) and np.all(floor > 0)
        for name in ("nonlin_norm", "lin_ratio", "nonlin_to_output"):
            assert np.all(np.isnan(ds[name].values)), name
        assert np.all(np.isfinite(ds.lin_norm.values))  # the first-order part is still measured
