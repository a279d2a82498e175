"""RecordStore's in-place append (zarr arrays grown directly) writes what xarray's append writes."""

import warnings

import numpy as np
import torch
import xarray as xr
import zarr

from probes.adapters import GPTAdapter
from probes.probe_log import ProbeLog
from probes.store import RecordStore, step_chunks
from trainer.data import DataConfig, TokenData
from trainer.model import GPT, ModelConfig
from trainer.parameterization import Parameterization


def _probe_rows(run_dir):
    """One real probe step's row (every variable the probes record) and the store's layout."""
    torch.manual_seed(0)
    model = GPT(Parameterization(name="alpha", alpha=1.0, width=32, depth=2, base_width=32, d_head=16),
                ModelConfig(seq_len=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = TokenData(DataConfig(), seq_len=16)
    log = ProbeLog(GPTAdapter(model), data.probe_batch(2), run_dir, steps=[0], attrs={
        "param": "alpha", "alpha": 1.0, "width": 32, "lr": 3e-3, "label": "store test"}, flush_every=10)
    batch = data.train_batch(seed=0, step=0, batch_size=2)
    model(batch[:, :-1], batch[:, 1:]).backward()
    with log.update(0, optimizer, train_loss=1.0, val_loss=2.0):
        optimizer.step()
    (step, row), = log._buffer
    store = log._open_store()
    return row, store.coords, store.attrs, store.dims


def test_in_place_appends_equal_one_xarray_write(tmp_path):
    row, coords, attrs, dims = _probe_rows(tmp_path / "run")
    extra = {n: d for n, d in dims.items() if n in row}
    gen = np.random.default_rng(0)
    steps = list(range(0, 140, 2))  # 70 steps: across the 64-step chunk boundary
    rows = [{k: np.asarray(v, dtype=np.float32) * gen.uniform(0.5, 2.0) for k, v in row.items()} for _ in steps]
    for r in rows[5:9]:
        r["lin_ratio"] = np.full_like(r["lin_ratio"], np.nan)  # NaN survives
    for r in rows:  # a variable NaN at every step (nonlin_floor of a float64 linearization): its chunks
        r["nonlin_floor"] = np.full_like(r["nonlin_floor"], np.nan)  # are still written, as xarray's are
    blocks = RecordStore(tmp_path / "blocks.zarr", coords, attrs, extra)
    reference = RecordStore(tmp_path / "xarray.zarr", coords, attrs, extra)
    for i, (start, stop) in enumerate(((0, 1), (1, 31), (31, 33), (33, 70))):
        blocks.append(steps[start:stop], rows[start:stop])  # first: xarray creates the store; then in place
        if i == 0:  # xarray's own first write (RecordStore writes it with its direct writer)
            first = reference._dataset(steps[start:stop], rows[start:stop])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                first.to_zarr(reference.path, mode="w-", encoding=step_chunks(first), consolidated=True,
                              write_empty_chunks=True)
        else:  # xarray's own append of the same block (what RecordStore did before)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reference._dataset(steps[start:stop], rows[start:stop]).to_zarr(
                    reference.path, append_dim="step", consolidated=True, write_empty_chunks=True)

    with xr.open_zarr(tmp_path / "blocks.zarr") as a, xr.open_zarr(tmp_path / "xarray.zarr") as b:
        xr.testing.assert_identical(a.load(), b.load())
        assert list(a.step.values) == steps
    # Also without the consolidated metadata (each array's own zarr.json), and the same array layout.
    with xr.open_zarr(tmp_path / "blocks.zarr", consolidated=False) as a, xr.open_zarr(tmp_path / "xarray.zarr") as b:
        xr.testing.assert_identical(a.load(), b.load())
    ga, gb = zarr.open_group(tmp_path / "blocks.zarr", mode="r"), zarr.open_group(tmp_path / "xarray.zarr", mode="r")
    for name, array in gb.arrays():
        other = ga[name]
        assert (other.shape, other.chunks, other.dtype, other.metadata.dimension_names) == \
            (array.shape, array.chunks, array.dtype, array.metadata.dimension_names), name
        assert np.array_equal(other[...], array[...], equal_nan=array.dtype.kind == "f"), name
    # The same chunk files: an all-NaN chunk is written too (write_empty_chunks), since a chunk file
    # absent on disk is read as damage (analyses.load.missing_data).
    files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("c/**/*") if p.is_file())  # noqa: E731
    assert files(tmp_path / "blocks.zarr") == files(tmp_path / "xarray.zarr")

