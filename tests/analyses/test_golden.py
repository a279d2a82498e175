"""Golden records: an unintended change of numerics in trainer, probes or analyses fails here.

tests/golden/sweep.zarr and expected.json were produced by `python -m tests.golden.make_golden`; rerun it
(and review the diff) only for an intended change.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from tests.golden.make_golden import KEEP, analysis_numbers, train_golden_run

GOLDEN = Path(__file__).parents[1] / "golden"


@pytest.fixture(scope="module")
def golden():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return xr.open_zarr(GOLDEN / "sweep.zarr").load()


def test_analyses_reproduce_the_committed_numbers(golden):
    expected = json.loads((GOLDEN / "expected.json").read_text())
    got = json.loads(json.dumps(analysis_numbers(golden)))
    for section in ("laziness", "depth_coord"):
        assert len(got[section]) == len(expected[section])
        for g, e in zip(got[section], expected[section]):
            for key, value in e.items():
                if isinstance(value, float):
                    assert g[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (section, key, e)
                else:
                    assert g[key] == value


def test_a_fresh_run_reproduces_its_golden_records(golden, tmp_path):
    # Same CPU math, same seed: the records agree to float32 round-off (1e-5 relative allows for a
    # different BLAS or CPU; a changed formula or init moves them by far more).
    torch.set_num_threads(1)
    run_dir = train_golden_run(tmp_path, alpha=1.0, depth=4, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = xr.open_zarr(run_dir / "probes.zarr").load()
    ref = golden.sel(param="alpha=1", depth=4, seed=1).squeeze(drop=True)
    for name in KEEP:
        a = fresh[name].squeeze(drop=True).values
        b = ref[name].sel(layer=slice(0, 3)).values if "layer" in ref[name].dims else ref[name].values
        np.testing.assert_allclose(a, b.reshape(a.shape), rtol=1e-5, atol=1e-7, err_msg=name)
