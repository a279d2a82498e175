"""Synthetic run dirs in the real on-disk format, built from planted power laws plus seeded noise.

Reusable outside this folder (`from tests.analyses.conftest import SynthRun, write_run`):
`write_run(path, SynthRun(...))` writes one run dir (probes.zarr via
`xr.Dataset.to_zarr`, appended along `step` in blocks as the trainer does; config.json;
metrics.jsonl; status.json) and `write_sweep(root, specs)` a sweep dir of them. Each quantity follows
a known law in depth/width/lr, so analyses can be checked against the exponents planted here.
"""

from __future__ import annotations

import json
import math
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from probes import schema

GROUPS = ["embedding", "block_norm", "hidden_weight", "hidden_bias", "final_norm", "unembedding"]
BASE_LR = 2.0**-8


@dataclass(frozen=True)
class SynthRun:
    """One synthetic run: identity, probe schedule and the laws its records follow."""

    param: str = "alpha"  # "sp" | "mup" | "alpha"
    alpha: float = 1.0  # used only for param "alpha"
    depth: int = 4
    width: int = 64
    seed: int = 0
    lr: float = BASE_LR
    steps: tuple[int, ...] = (0, 1, 2, 4, 8, 16)  # probe steps
    lin_slope: float | None = None  # lin_ratio ∝ (depth/2)^lin_slope; None: theory (α−1, or 0 for sp/mup)
    lin_scale: float = 1e-2  # lin_ratio at depth 2
    step0_factor: float = 100.0  # lin_ratio at step 0 is off-law by this factor (the default window skips it)
    depth_exponent: tuple[float, float] = (0.0, 0.0)  # final_abs_mean ∝ depth^e at step 0 / at steps ≥ 1
    width_exponent: float = 0.0  # act_rms, delta0_rms ∝ width^e
    update_width_exponent: tuple[float, ...] = (0.0, 0.0, 0.0)  # update_rms ∝ width^e per schema.BLOCK_ROLES
    share_decay: float = 0.0  # final_update_share of layer l ∝ exp(-share_decay * l)
    embed_share: float = 0.1  # the embedding's share of the final-stream update
    noise: float = 0.02  # σ of the log-normal noise on each recorded element
    seed_noise: float = 0.05  # σ of a log-normal factor per run: the seed-to-seed spread
    final_loss: float = 2.0  # NaN: the run diverges half-way (loss NaN, status failed)
    train_steps: int = 40
    val_every: int | None = 10  # validation every k steps and at the last step; None: no validation
    blocks: int = 2  # number of to_zarr writes of the probe steps (first write + appends)
    variables: tuple[str, ...] | None = None  # subset of schema.VARIABLES to write (None: all)

    @property
    def slope(self) -> float:
        if self.lin_slope is not None:
            return self.lin_slope
        return self.alpha - 1.0 if self.param == "alpha" else 0.0

    @property
    def name(self) -> str:
        tag = self.param if self.param != "alpha" else f"a{self.alpha:g}"
        return f"{tag}_d{self.depth}_w{self.width}_lr{math.log2(self.lr):g}_s{self.seed}"


def _rng(spec: SynthRun) -> np.random.Generator:
    key = f"{spec.param}|{spec.alpha}|{spec.depth}|{spec.width}|{spec.seed}|{spec.lr!r}"
    return np.random.default_rng(zlib.crc32(key.encode()))


def probe_dataset(spec: SynthRun) -> xr.Dataset:
    """The run's full probe Dataset (all steps), laid out exactly as the schema says."""
    rng = _rng(spec)
    steps = np.asarray(spec.steps, dtype=np.int64)
    S, L = len(steps), spec.depth
    coords = {"step": steps, **schema.coords_for(L, GROUPS)}
    n_site, n_role, n_grole = len(schema.SITES), len(schema.BLOCK_ROLES), len(schema.GLOBAL_ROLES)

    def lognoise(*shape: int) -> np.ndarray:
        return np.exp(spec.noise * rng.standard_normal(shape))

    run_factor = math.exp(spec.seed_noise * rng.standard_normal())
    trained = (steps >= 1).astype(float)
    wfac = spec.width**spec.width_exponent

    lin = spec.lin_scale * (spec.depth / 2) ** spec.slope * run_factor * lognoise(S, L, 2)
    lin[steps == 0] *= spec.step0_factor
    nonlin_out = (spec.lin_scale * (spec.depth / 2) ** spec.slope * run_factor) ** 2 * lognoise(S, L, 2)
    lin_norm = np.ones((S, L, 2))
    e0, e1 = spec.depth_exponent
    exponent = np.where(steps >= 1, e1, e0)
    final_abs = 0.8 * spec.depth**exponent * run_factor * lognoise(S)
    act = wfac * (1 + 0.05 * np.arange(n_site))[None, None, :] * run_factor * lognoise(S, L, n_site)
    growth = np.sqrt(np.maximum(steps, 0))[:, None, None]
    delta0 = 0.1 * growth * wfac * run_factor * lognoise(S, L, n_site)
    profile = np.exp(-spec.share_decay * np.arange(L))
    share = (1 - spec.embed_share) * profile / profile.sum()
    share_t = np.where(steps[:, None] >= 1, share[None, :], np.nan)
    loss_t = np.interp(steps, np.arange(spec.train_steps), _loss_curve(spec))

    def v(name: str, values) -> tuple:
        dims = ("step", *schema.VARIABLES[name].dims)
        return dims, np.asarray(values, dtype=np.float64 if name in ("lin_ratio", "nonlin_to_output") else np.float32)

    data = {
        "act_rms": v("act_rms", act),
        "delta0_rms": v("delta0_rms", delta0),
        "delta_prev_rms": v("delta_prev_rms", 0.5 * delta0),
        "branch_norm": v("branch_norm", lin * lin_norm / nonlin_out),
        "lin_norm": v("lin_norm", lin_norm),
        "nonlin_norm": v("nonlin_norm", lin * lin_norm),
        "lin_ratio": v("lin_ratio", lin),
        "nonlin_to_output": v("nonlin_to_output", nonlin_out),
        "branch_to_stream": v("branch_to_stream", np.full((S, L, 2), 0.1)),
        "stream_cosine": v("stream_cosine", np.full((S, L), 0.99)),
        "final_update_share": v("final_update_share", share_t),
        "grad_rms": v("grad_rms", np.full((S, L), 1e-3)),
        "update_rel": v("update_rel", 1e-3 * trained[:, None, None] * np.ones((S, L, n_role))),
        "update_rms": v("update_rms", 1e-4 * np.power(float(spec.width), spec.update_width_exponent)[None, None, :]
                        * run_factor * lognoise(S, L, n_role)),
        "global_update_rel": v("global_update_rel", np.full((S, n_grole), 1e-3)),
        "global_update_rms": v("global_update_rms", np.full((S, n_grole), 1e-4)),
        "effective_lr": v("effective_lr", np.full((S, len(GROUPS)), spec.lr)),
        "final_rms": v("final_rms", 1.25 * final_abs),
        "final_abs_mean": v("final_abs_mean", final_abs),
        "final_delta0_rms": v("final_delta0_rms", 0.2 * np.sqrt(steps)),
        "embed_update_share": v("embed_update_share", np.where(steps >= 1, spec.embed_share, np.nan)),
        "probe_loss": v("probe_loss", loss_t),
        "train_loss": v("train_loss", loss_t),
        "val_loss": v("val_loss", loss_t),
        "nonlin_floor": v("nonlin_floor", np.full((S, L, 2), np.nan)),  # float64 runs: floor not measured
        "lin_below_floor": v("lin_below_floor", np.zeros((S, L, 2))),
    }
    # Feature change since θ_0 (first order, like lin_ratio) and 1 − CKA (second order); no rng draws,
    # so the values above stay what they were.
    since = np.where(steps >= 1, 1.0, np.nan)[:, None, None] * np.ones((S, L, 2))
    feature = 0.1 * (spec.depth / 2) ** spec.slope * run_factor * since
    data.update({
        "feature_change": v("feature_change", feature),
        "feature_cka": v("feature_cka", 1 - feature**2),
        "attn_pattern_change": v("attn_pattern_change", feature[:, :, 0]),
    })
    # The block-linearized model's variables live in their own store (linearized.zarr), not here.
    expected = set(schema.VARIABLES) - set(schema.LINEARIZED_VARIABLES)
    assert set(data) == expected, "builder out of date with probes.schema"
    if spec.variables is not None:
        # A subset keeps only the coordinates its variables use: each coordinate is one more array to
        # write and read, and the tests that write subsets run many small stores.
        data = {k: data[k] for k in spec.variables}
        used = {d for dims, _ in data.values() for d in dims}
        coords = {k: v for k, v in coords.items() if k in used}
    alpha = spec.alpha if spec.param == "alpha" else math.nan
    config = {"model": {"width": spec.width, "depth": spec.depth}, "param": spec.param, "alpha": alpha, "lr": spec.lr}
    attrs = {
        "param": spec.param,
        "alpha": alpha,
        "width": spec.width,
        "depth": spec.depth,
        "seed": spec.seed,
        "lr": spec.lr,
        "schema_version": schema.SCHEMA_VERSION,
        "config": json.dumps(config),
        "versions": json.dumps({"python": "3", "synthetic": True}),
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)


def _loss_curve(spec: SynthRun) -> np.ndarray:
    """Train loss per step: decays fast to final_loss; NaN from half-way when the run diverges."""
    t = np.arange(spec.train_steps)
    final = spec.final_loss if math.isfinite(spec.final_loss) else 2.0
    loss = final + 3.0 * np.exp(-t / (spec.train_steps / 20))
    if not math.isfinite(spec.final_loss):
        loss[spec.train_steps // 2 :] = np.nan
    return loss


def write_run(path: str | Path, spec: SynthRun) -> Path:
    """Write one synthetic run dir at `path` (created) and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ds = probe_dataset(spec)
    blocks = np.array_split(np.arange(ds.sizes["step"]), max(1, min(spec.blocks, ds.sizes["step"])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr 3 warns that consolidated metadata is not in its spec yet
        for i, idx in enumerate(blocks):
            block = ds.isel(step=idx)
            if i == 0:
                block.to_zarr(path / schema.STORE_NAME, mode="w")
            else:
                block.to_zarr(path / schema.STORE_NAME, append_dim="step")
    loss = _loss_curve(spec)
    diverged = not math.isfinite(spec.final_loss)
    # As the trainer writes it: one line per update, and each validation as a line of its own: before
    # update 0, every val_every updates, and after the last update (step == train_steps).
    with open(path / schema.METRICS_NAME, "w") as f:
        for t, value in enumerate(loss):
            if spec.val_every is not None and t % spec.val_every == 0:
                f.write(json.dumps({"step": t, "val_loss": float(value)}) + "\n")
            row = {"step": t, "loss": float(value), "lr": spec.lr, "grad_norm": 1.0, "tokens_per_s": 1e4}
            f.write(json.dumps(row) + "\n")
            if diverged and not math.isfinite(value):
                break  # the trainer stops at the first non-finite loss
        if spec.val_every is not None and not diverged:
            f.write(json.dumps({"step": spec.train_steps, "val_loss": float(loss[-1])}) + "\n")
    (path / schema.CONFIG_NAME).write_text(ds.attrs["config"])
    state = "failed" if diverged else "finished"
    status = {"state": state, "step": len(loss)}
    if diverged:  # as the trainer's NaN stop writes it: the step whose loss was non-finite
        status["bad_step"] = int(np.flatnonzero(~np.isfinite(loss))[0])
    (path / schema.STATUS_NAME).write_text(json.dumps(status))
    return path


def write_sweep(root: str | Path, specs: list[SynthRun]) -> list[Path]:
    """Write each spec as root/<spec.name>; returns the run dirs."""
    return [write_run(Path(root) / s.name, s) for s in specs]


# --- planted sweeps shared by the tests ---------------------------------------------------------------

DEPTHS = (2, 4, 8, 16)
# label → (param, alpha, depth exponents of final_abs_mean (init, trained))
DEPTH_PARAMS = {
    "sp": ("sp", math.nan, (0.5, 1.0)),
    "alpha=0.5": ("alpha", 0.5, (0.0, 0.0)),
    "alpha=1": ("alpha", 1.0, (-0.5, 0.0)),
}


# Writing a store costs ~5 ms per variable here, so sweeps record only what their tests read.
DEPTH_VARIABLES = ("lin_ratio", "nonlin_to_output", "final_abs_mean", "final_rms", "delta0_rms",
                   "final_update_share", "embed_update_share")
WIDTH_VARIABLES = ("act_rms", "update_rms", "delta0_rms")


def depth_specs(seeds=(0, 1, 2)) -> list[SynthRun]:
    return [
        SynthRun(param=p, alpha=a if p == "alpha" else 1.0, depth=d, seed=s, depth_exponent=e, share_decay=0.3,
                 blocks=1, variables=DEPTH_VARIABLES)
        for p, a, e in DEPTH_PARAMS.values()
        for d in DEPTHS
        for s in seeds
    ]


WIDTHS = (64, 128, 256)
WIDTH_EXPONENT = {"mup": 0.0, "sp": 0.5}
# update_rms ∝ width^e per block role in schema.BLOCK_ROLES order (block_norm, hidden_weight, hidden_bias),
# from Table 1: Adam moves each entry by about its LR, and only µP's hidden-weight LR scales with width
# (η_base · m_N^-1).
UPDATE_WIDTH_EXPONENT = {"mup": (0.0, -1.0, 0.0), "sp": (0.0, 0.0, 0.0)}


def width_specs() -> list[SynthRun]:
    return [
        SynthRun(param=p, depth=2, width=w, seed=s, width_exponent=e, update_width_exponent=UPDATE_WIDTH_EXPONENT[p],
                 steps=(0, 1, 2, 4), blocks=1, variables=WIDTH_VARIABLES)
        for p, e in WIDTH_EXPONENT.items()
        for w in WIDTHS
        for s in (0, 1)
    ]


TRANSFER_LOG2_LRS = (-11, -10, -9, -8, -7, -6)
TRANSFER_DEPTHS = (2, 4, 8)
TRANSFER_DRIFT = {"mup": -1.0, "alpha=1": 0.0}  # d log2(lr*) / d log2(depth)
TRANSFER_CURVATURE = 0.05  # loss = best(depth) + c * (log2 lr - log2 lr*)^2


def planted_log2_lr_opt(label: str, depth: int) -> float:
    """log2 of the planted optimal LR: -8.3 at depth 2 (off the grid on purpose), drifting with depth."""
    return -8.3 + TRANSFER_DRIFT[label] * math.log2(depth / 2)


def transfer_specs() -> list[SynthRun]:
    specs = []
    for label in TRANSFER_DRIFT:
        param, alpha = ("mup", 1.0) if label == "mup" else ("alpha", 1.0)
        for depth in TRANSFER_DEPTHS:
            for x in TRANSFER_LOG2_LRS:
                for seed in (0, 1):
                    opt = planted_log2_lr_opt(label, depth)
                    loss = 2.0 - 0.05 * math.log2(depth) + TRANSFER_CURVATURE * (x - opt) ** 2
                    loss += 0.002 * np.random.default_rng([depth, x + 20, seed]).standard_normal()
                    if x - opt > 2.5:  # too large an LR diverges
                        loss = math.nan
                    specs.append(
                        SynthRun(param=param, alpha=alpha, depth=depth, seed=seed, lr=2.0**x, final_loss=loss,
                                 steps=(0, 1), blocks=1, variables=("probe_loss",))
                    )
    return specs


@pytest.fixture(scope="session")
def depth_sweep(tmp_path_factory) -> Path:
    """Sweep dir: sp, α=0.5, α=1 at depths 2–16, 3 seeds, with the theory's lin_ratio slopes."""
    root = tmp_path_factory.mktemp("depth_sweep")
    write_sweep(root, depth_specs())
    return root


@pytest.fixture(scope="session")
def width_sweep(tmp_path_factory) -> Path:
    """Sweep dir: mup (flat in width) and sp (act_rms ∝ width^0.5) at widths 64–256, 2 seeds."""
    root = tmp_path_factory.mktemp("width_sweep")
    write_sweep(root, width_specs())
    return root


@pytest.fixture(scope="session")
def transfer_sweep(tmp_path_factory) -> Path:
    """Sweep dir: mup (optimum drifts as depth^-1) and α=1 (no drift) over an LR grid, 2 seeds."""
    root = tmp_path_factory.mktemp("transfer_sweep")
    write_sweep(root, transfer_specs())
    return root


@pytest.fixture
def one_run(tmp_path) -> Path:
    return write_run(tmp_path / "run", SynthRun(depth=4, share_decay=0.5))



@pytest.fixture(scope="session")
def cli_sweep(tmp_path_factory) -> Path:
    """Small sweep dir for CLI tests: α=0.5 and α=1 at depths 2, 4, 8 with 3 seeds, few variables."""
    root = tmp_path_factory.mktemp("cli_sweep")
    keep = ("lin_ratio", "nonlin_to_output", "final_abs_mean", "final_rms", "delta0_rms", "final_update_share")
    write_sweep(root, [SynthRun(alpha=a, depth=d, seed=s, blocks=1, variables=keep)
                       for a in (0.5, 1.0) for d in (2, 4, 8) for s in (0, 1, 2)])
    return root


@pytest.fixture(scope="session")
def depth_ds(depth_sweep):
    """The depth sweep opened once (analyses must not modify it)."""
    from analyses.load import open_sweep

    return open_sweep(depth_sweep)


@pytest.fixture(scope="session")
def transfer_ds(transfer_sweep):
    from analyses.load import open_sweep

    return open_sweep(transfer_sweep)


@pytest.fixture(scope="session")
def transfer_losses(transfer_ds):
    """`final_losses` of the transfer sweep (read once)."""
    from analyses.transfer import final_losses

    return final_losses(transfer_ds)


@pytest.fixture(scope="session")
def width_ds(width_sweep):
    from analyses.load import open_sweep

    return open_sweep(width_sweep)
