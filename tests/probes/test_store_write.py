"""The store's first write (through a zarr MemoryStore) gives the very files that xarray's own
`to_zarr` writes straight to disk, and the store keeps appending and reading as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from probes.schema import coords_for
from probes.store import RecordStore, write_new

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
