"""The block-linearized model against independent computations: the real model and a Taylor expansion."""

import copy

import numpy as np
import torch

from probes.adapters import GPTAdapter
from probes.linearized_model import BlockLinearizedModel, lin_steps
from trainer.model import GPT, ModelConfig
from trainer.parameterization import Parameterization


def _pair(depth: int = 2):
    torch.manual_seed(0)
    model = GPT(Parameterization(name="alpha", width=32, depth=depth, d_head=16, base_width=32),
                ModelConfig(seq_len=16))
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, theta0


BATCH = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))


def _real_final_stream(model: GPT) -> tuple[float, torch.Tensor]:
    m = copy.deepcopy(model).double().eval()
    store = {}
    handle = m.final_hook.register_forward_hook(lambda mod, args, out: store.setdefault("x", out))
    with torch.no_grad():
        loss = m(BATCH[:, :-1], BATCH[:, 1:])
    handle.remove()
    return float(loss), store["x"]


def test_at_initialization_the_surrogate_is_the_model():
    model, theta0 = _pair()
    surrogate = BlockLinearizedModel(GPTAdapter(model), theta0)
    loss, stream = surrogate.loss(BATCH, range(2), final_stream=True)
    real_loss, real_stream = _real_final_stream(model)
    assert torch.allclose(stream, real_stream, rtol=0, atol=1e-12)
    assert abs(float(loss) - real_loss) < 1e-6


def test_surrogate_error_is_second_order_in_the_update():
    # θ_t = θ_0 + ε v: the surrogate differs from the model only by the branches' second-order terms,
    # so ‖stream_lin − stream_model‖ ∝ ε², while the model itself moves ∝ ε.
    model, theta0 = _pair()
    direction = {n: torch.randn_like(p) for n, p in theta0.items()}
    gaps, moves = [], []
    _, stream0 = _real_final_stream(model)
    for eps in (1e-2, 1e-3):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(theta0[n] + eps * direction[n])
        surrogate = BlockLinearizedModel(GPTAdapter(model), theta0)
        _, lin_stream = surrogate.loss(BATCH, range(2), final_stream=True)
        _, real_stream = _real_final_stream(model)
        gaps.append(float((lin_stream - real_stream).norm()))
        moves.append(float((real_stream - stream0).norm()))
    assert 80 < gaps[0] / gaps[1] < 125  # ε² (ratio 100)
    assert 8 < moves[0] / moves[1] < 12.5  # the update itself is first order
    assert gaps[1] / moves[1] < gaps[0] / moves[0] / 8  # relative to the move, the error vanishes ∝ ε


def test_one_block_linearized_matches_its_branch_taylor_expansion():
    # With only block 0 linearized, block 0's added output equals F(h;θ_0) + finite-difference JVP of the
    # real branch module, computed independently in float64 on the real model's input h.
    model, theta0 = _pair(depth=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    surrogate = BlockLinearizedModel(GPTAdapter(model), theta0)
    _, lin_stream = surrogate.loss(BATCH, [0], final_stream=True)
    m = copy.deepcopy(model).double().eval()
    m.set_attention_backend("math")
    block = m.blocks[0]
    with torch.no_grad():
        h = m.embed(BATCH[:, :-1])
        names = dict(block.named_parameters())
        t0 = {k: theta0[f"blocks.0.{k}"].double() for k in names}
        tt = {k: v.detach() for k, v in names.items()}

        def branch_lin(module, prefix, x):
            local = {k.removeprefix(prefix): v for k, v in t0.items() if k.startswith(prefix)}
            step = {k.removeprefix(prefix): tt[k] - t0[k] for k in t0 if k.startswith(prefix)}
            f = lambda s: torch.func.functional_call(module, {k: local[k] + s * step[k] for k in local}, (x,))  # noqa: E731
            return f(0.0) + (f(1e-4) - f(-1e-4)) / 2e-4

        mid = h + block.branch_multiplier * branch_lin(block.attn_branch, "attn_branch.", h)
        out = mid + block.branch_multiplier * branch_lin(block.mlp_branch, "mlp_branch.", mid)
    assert torch.allclose(lin_stream, out, rtol=0, atol=1e-8)


def test_default_cadence_is_log_spaced_and_ends_at_the_last_step():
    steps = lin_steps(400)
    assert steps[0] == 1 and steps[-1] == 399 and len(steps) == 4
    assert all(b > 5 * a for a, b in zip(steps, steps[1:]))
    assert lin_steps(400, 0) == [] and lin_steps(1) == [] and lin_steps(400, 1) == [399]


def test_recorder_cadence_and_offline_command_agree_with_the_model(tmp_path):
    import subprocess
    import sys

    import xarray as xr

    from probes.linearized_model import DEFAULT_BATCH_SIZE
    from tests.conform_sweeps import tiny_run
    from trainer import checkpoint as ckpt
    from trainer.data import TokenData
    from trainer.loop import RunSpec

    run = tiny_run(tmp_path / "run", steps=4, linearized=2)
    with xr.open_zarr(run / "linearized.zarr") as ds:
        assert list(ds["step"].values) == [1, 3]  # log-spaced up to the last step's θ
        assert ds["linearized_block_loss"].shape == (2, 2)
        assert np.isfinite(ds["linearized_share"].values).all()
    proc = subprocess.run([sys.executable, "-m", "diagnose", "linearize", str(run)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    with xr.open_zarr(run / "linearized.zarr") as ds:
        assert list(ds["step"].values) == [1, 3, 4]
        offline = ds.sel(step=4).load()
    # The real model's loss at the checkpoint, computed directly, on the same held-out sequences.
    import json

    spec = RunSpec.from_dict(json.loads((run / "config.json").read_text()))
    model = GPT(spec.param, spec.model)
    model.load_state_dict(ckpt.load(run / "checkpoint.pt")["model"])
    batch = TokenData(spec.data, spec.model.seq_len).probe_batch(DEFAULT_BATCH_SIZE, 1)
    with torch.no_grad():
        direct = float(model.double()(batch[:, :-1], batch[:, 1:]))
    assert abs(float(offline["linearized_model_loss"]) - direct) < 1e-5
    share = (offline["linearized_init_loss"] - offline["linearized_loss"]) / (
        offline["linearized_init_loss"] - offline["linearized_model_loss"])
    assert abs(float(share) - float(offline["linearized_share"])) < 1e-5
