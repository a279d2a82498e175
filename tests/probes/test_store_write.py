"""The store's first write (its arrays created directly with zarr, in a MemoryStore) gives the very
files that xarray's own `to_zarr` writes straight to disk, for the synthetic rows here and for a real
probe step's every variable; other layouts go through xarray; the store keeps appending and reading."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from probes.schema import coords_for
from probes.store import RecordStore, _direct_layout, step_chunks, write_new
from tests.probes.test_store_append import _probe_rows

DEPTH = 3


def _rows(steps: list[int], seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in steps:
        lin = rng.random((DEPTH, 2))
        lin[0, 1] = np.nan  # a NaN inside a chunk
        rows.append({"train_loss": np.asarray(rng.random()), "lin_ratio": lin,
                     "nonlin_floor": np.full((DEPTH, 2), np.nan),  # an all-NaN variable: its chunk is written too
                     "update_rms": rng.random((DEPTH, 3)), "attn_max_logit": rng.random((DEPTH, 2))})
    return rows


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _store(path: Path) -> RecordStore:
    coords = coords_for(DEPTH, ["hidden", "embed"]) | {"head": [0, 1]}
    return RecordStore(path, coords, {"param": "alpha", "alpha": 1.0, "depth": DEPTH},
                       extra_dims={"attn_max_logit": ("layer", "head")})


def test_first_write_is_byte_for_byte_what_xarray_writes(tmp_path):
    store = _store(tmp_path / "fast.zarr")
    steps, rows = [0, 1, 5], _rows([0, 1, 5], seed=0)
    store.append(steps, rows)
    ds = store._dataset(steps, rows)
    encoding = {name: {"chunks": (64,) + ds[name].shape[1:]} for name in ds.data_vars}
    ds.to_zarr(tmp_path / "xarray.zarr", mode="w-", encoding=encoding, consolidated=True, write_empty_chunks=True)
    fast, reference = _files(tmp_path / "fast.zarr"), _files(tmp_path / "xarray.zarr")
    assert len(reference) > 10 and fast == reference
    assert not (tmp_path / "fast.zarr.new").exists()

    # Later blocks append to it as before; a reader sees every step with its values.
    store.append([10, 11], _rows([10, 11], seed=1))
    with xr.open_zarr(tmp_path / "fast.zarr") as back:
        assert back.step.values.tolist() == [0, 1, 5, 10, 11]
        expected = np.stack([r["lin_ratio"] for r in rows + _rows([10, 11], seed=1)]).astype(np.float32)
        np.testing.assert_array_equal(back.lin_ratio.values, expected)
        assert np.isnan(back.nonlin_floor.values).all()


def test_first_write_never_replaces_a_store(tmp_path):
    store = _store(tmp_path / "s.zarr")
    store.append([0], _rows([0], seed=0))
    ds = store._dataset([1], _rows([1], seed=2))
    with pytest.raises(FileExistsError, match="already exists"):
        write_new(ds, tmp_path / "s.zarr", {})
    with xr.open_zarr(tmp_path / "s.zarr") as back:
        assert back.step.values.tolist() == [0]


def _xarray_write(ds: xr.Dataset, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.to_zarr(path, mode="w-", encoding=step_chunks(ds), consolidated=True, write_empty_chunks=True)


def _direct_write(ds: xr.Dataset, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_new(ds, path, step_chunks(ds))


def test_direct_writer_gives_xarrays_store_for_a_real_probe_step(tmp_path):
    # Every variable the probes record (a real ProbeLog step), 70 steps: two chunks along step, NaNs in one.
    row, coords, attrs, dims = _probe_rows(tmp_path / "run")
    store = RecordStore(tmp_path / "unused.zarr", coords, attrs, {n: d for n, d in dims.items() if n in row})
    gen = np.random.default_rng(3)
    steps = list(range(0, 140, 2))
    rows = [{k: np.asarray(v, dtype=np.float32) * gen.uniform(0.5, 2.0) for k, v in row.items()} for _ in steps]
    for r in rows[60:66]:
        r["lin_ratio"] = np.full_like(r["lin_ratio"], np.nan)
    ds = store._dataset(steps, rows)
    assert _direct_layout(ds, step_chunks(ds))  # the fast path is the one taken for real records
    _direct_write(ds, tmp_path / "direct.zarr")
    _xarray_write(ds, tmp_path / "xarray.zarr")
    direct, reference = _files(tmp_path / "direct.zarr"), _files(tmp_path / "xarray.zarr")
    assert len(reference) > 100 and direct == reference

    # As xarray reads them back, with and without the consolidated metadata: values, shapes, chunks,
    # dtypes, fill values, dimension names, attributes and encodings.
    for consolidated in (True, False):
        with xr.open_zarr(tmp_path / "direct.zarr", consolidated=consolidated) as a, \
                xr.open_zarr(tmp_path / "xarray.zarr", consolidated=True) as b:
            a, b = a.load(), b.load()
            xr.testing.assert_identical(a, b)
            for name in b.variables:
                # repr: fill values are NaN, which == never matches
                assert repr(sorted(a[name].encoding.items())) == repr(sorted(b[name].encoding.items())), name
                assert a[name].dims == b[name].dims and a[name].attrs == b[name].attrs, name
    ga, gb = zarr.open_group(tmp_path / "direct.zarr", mode="r"), zarr.open_group(tmp_path / "xarray.zarr", mode="r")
    assert dict(ga.attrs) == dict(gb.attrs)
    for name, array in gb.arrays():
        other = ga[name]
        assert (other.shape, other.chunks, other.dtype, other.metadata.dimension_names, dict(other.attrs)) == \
            (array.shape, array.chunks, array.dtype, array.metadata.dimension_names, dict(array.attrs)), name
        assert np.array_equal(other.fill_value, array.fill_value, equal_nan=array.dtype.kind == "f"), name
        assert np.array_equal(other[...], array[...], equal_nan=array.dtype.kind == "f"), name


@pytest.mark.parametrize("change", ["float64 variable", "numpy attribute", "float coordinate", "encoded variable"])
def test_other_layouts_are_written_by_xarray(tmp_path, change):
    # What the direct writer was not checked for goes through xarray, and gives xarray's files.
    store = _store(tmp_path / "unused.zarr")
    ds = store._dataset([0, 1], _rows([0, 1], seed=4))
    if change == "float64 variable":
        ds["train_loss"] = ds.train_loss.astype(np.float64)
    elif change == "numpy attribute":
        ds.attrs["alpha"] = np.float64(0.5)
    elif change == "float coordinate":
        ds = ds.assign_coords(head=np.asarray([0.5, 1.5]))
    else:
        ds.lin_ratio.encoding = {"dtype": "float16"}
    assert not _direct_layout(ds, step_chunks(ds))
    _direct_write(ds.copy(), tmp_path / "ours.zarr")
    _xarray_write(ds.copy(), tmp_path / "xarray.zarr")
    assert _files(tmp_path / "ours.zarr") == _files(tmp_path / "xarray.zarr")
