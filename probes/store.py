"""The probe records on disk: an xarray Dataset appended along `step` to a zarr store, in blocks.

A reader can `xarray.open_zarr` the store while the run goes on; a crash loses at most the block not
yet flushed. On resume, steps at or after the checkpoint's step are dropped (they will be measured
again, bitwise the same), so the store has no duplicate and no gap.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr.api.asynchronous as zarr_async
from zarr.core.sync import sync as zarr_sync

from probes.schema import VARIABLES


class RecordStore:
    """Append-only (plus truncate-on-resume) store of probe steps."""

    def __init__(self, path: Path, coords: dict[str, list], attrs: dict[str, Any],
                 extra_dims: dict[str, tuple[str, ...]] | None = None):
        self.path, self.coords, self.attrs = Path(path), coords, attrs
        self.dims = {name: v.dims for name, v in VARIABLES.items()} | dict(extra_dims or {})

    def _dataset(self, steps: list[int], rows: list[dict[str, np.ndarray]]) -> xr.Dataset:
        data = {}
        for name in rows[0]:
            if name not in self.dims:
                raise KeyError(f"probe variable {name!r} is not declared in probes.schema or registered")
            dims = ("step",) + self.dims[name]
            values = np.stack([np.asarray(r[name], dtype=np.float32) for r in rows])
            attrs = {"units": VARIABLES[name].units, "description": VARIABLES[name].description} \
                if name in VARIABLES else {}
            data[name] = xr.Variable(dims, values, attrs=attrs)
        coords = {"step": np.asarray(steps, dtype=np.int64)}
        for dim, values in self.coords.items():
            if any(dim in self.dims[n] for n in data):
                coords[dim] = np.asarray(values)
        # Every chunk is written, all-NaN ones too, so that a chunk file absent on disk means damage
        # (analyses.load.missing_data reads this flag; zarr 3 otherwise skips all-NaN chunks).
        return xr.Dataset(data, coords=coords, attrs={**self.attrs, "write_empty_chunks": True})

    def append(self, steps: list[int], rows: list[dict[str, np.ndarray]]) -> None:
        """Append probe steps (in increasing order) to the store, creating it on the first call."""
        if not steps:
            return
        ds = self._dataset(steps, rows)
        with warnings.catch_warnings():
            # zarr v3 warns that fixed-width strings (our site/branch labels) are not in its spec yet.
            warnings.simplefilter("ignore", category=UserWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            if self.path.exists():
                if not zarr_sync(self._append_in_place(ds)):
                    ds.to_zarr(self.path, append_dim="step", consolidated=True, write_empty_chunks=True)
            else:
                write_new(ds, self.path, step_chunks(ds))

    async def _append_in_place(self, ds: xr.Dataset) -> bool:
        """Append `ds` by growing the store's arrays along `step` and writing the new rows, all arrays
        at once on zarr's event loop; False (nothing written) when the store is not laid out as `ds`.

        What xarray's `to_zarr(append_dim=...)` writes for these variables (float32 values, int64
        steps, no encoding), at 1/1.6 to 1/2.3 of its CPU time (benchmarks/RESULTS.md): xarray opens,
        resizes and writes each array in its own round trip to zarr's event loop, ≈ 0.2 s per append
        at ~50 variables whatever they carry. Order: the data variables, then the `step` coordinate,
        then the consolidated metadata that readers (xarray.open_zarr, the resume's truncate) take the
        shapes from. Until that last write a reader sees the store as it was before this append; the
        chunks of steps already recorded are rewritten with their same values (a partly filled chunk),
        as xarray does."""
        group = await zarr_async.open_group(store=str(self.path), mode="r+")
        if group.metadata.consolidated_metadata is None:
            return False  # not written by this class: xarray's path
        # Every chunk is written, all-NaN ones too (as the first write and xarray do): zarr's default
        # would delete a chunk that an append leaves all fill value, which readers take for damage.
        arrays = {name: (await group.getitem(name)).with_config({"write_empty_chunks": True})
                  for name in group.metadata.consolidated_metadata.metadata}
        names = [*ds.data_vars, "step"]
        on_step = {n for n, a in arrays.items() if "step" in (a.metadata.dimension_names or ())}
        if set(names) != on_step:
            return False  # a variable added or missing: xarray's path decides
        n0, n = arrays["step"].shape[0], ds.sizes["step"]
        values = {name: ds[name].values for name in names}
        for name in names:
            a, v = arrays[name], values[name]
            if a.shape[0] != n0 or a.shape[1:] != v.shape[1:] or a.dtype != v.dtype:
                return False

        async def grow(name: str) -> None:
            a = arrays[name]
            await a.resize((n0 + n,) + a.shape[1:])
            await a.setitem(slice(n0, n0 + n), values[name])

        await asyncio.gather(*(grow(name) for name in ds.data_vars))
        await grow("step")
        await zarr_async.consolidate_metadata(str(self.path))
        return True

    def truncate(self, step: int) -> None:
        """Drop every recorded step >= `step` (resume support). Rewrites via a temporary store."""
        if not self.path.exists():
            return
        with xr.open_zarr(self.path) as ds:
            if int((ds.step >= step).sum()) == 0:
                return
            kept = ds.sel(step=ds.step < step).load()
        tmp = self.path.with_name(self.path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if kept.sizes["step"]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=UserWarning)
                warnings.simplefilter("ignore", category=FutureWarning)
                for var in kept.variables.values():
                    var.encoding = {}
                write_new(kept, tmp, step_chunks(kept))
        old = self.path.with_name(self.path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        self.path.rename(old)
        if tmp.exists():
            tmp.rename(self.path)
        shutil.rmtree(old, ignore_errors=True)


def step_chunks(ds: xr.Dataset) -> dict[str, dict]:
    """The store's encoding: every variable chunked along step in blocks of 64, so that an append adds
    a chunk, not a file per step."""
    return {name: {"chunks": (64,) + ds[name].shape[1:]} for name in ds.data_vars}


def write_new(ds: xr.Dataset, path: Path, encoding: dict[str, dict]) -> None:
    """`ds.to_zarr(path, mode="w-", encoding=encoding, consolidated=True, write_empty_chunks=True)`, byte for
    byte, in about a third of the CPU time. The store is built in a zarr MemoryStore and its files then
    written in one go: writing straight to a LocalStore costs each of the ~60 arrays several hops between
    threads (zarr's event loop and its file-I/O pool) for files of a few hundred bytes, and a short run's
    whole store is one such first write. A dataset laid out as the probe records are (`_direct_layout`)
    is built by `_create_direct`, every array at once on zarr's event loop; anything else by xarray.
    The store appears whole or not at all (written beside, then renamed)."""
    import zarr

    if path.exists():  # mode="w-": never replace a store
        raise FileExistsError(f"{path} already exists")
    files: dict = {}
    memory = zarr.storage.MemoryStore(files)
    if _direct_layout(ds, encoding):
        zarr_sync(_create_direct(memory, ds, encoding))
    else:
        ds.to_zarr(memory, mode="w-", encoding=encoding, consolidated=True, write_empty_chunks=True)
    tmp = path.with_name(path.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    for folder in sorted({os.path.dirname(key) for key in files}):
        os.makedirs(tmp / folder, exist_ok=True)
    for key, buffer in files.items():
        with open(tmp / key, "wb") as f:
            f.write(buffer.as_numpy_array())
    tmp.rename(path)


# xarray's `_FillValue` attribute of a float variable: NaN, as base64 of a little-endian float64
# (xarray.backends.zarr.FillValueCoder; tests/probes/test_store_write.py checks the files are the same).
_NAN_FILL_ATTR = base64.standard_b64encode(struct.pack("<d", float("nan"))).decode()
_PLAIN_ATTR = (str, int, float, bool)  # attribute values that xarray writes to zarr unchanged


def _direct_layout(ds: xr.Dataset, encoding: dict[str, dict]) -> bool:
    """Whether `_create_direct` writes exactly what xarray would for `ds`: float32 data variables
    (encoding: only "chunks"), coordinates that are dimension coordinates of int64 or fixed-width
    strings, plain attributes, no encoding carried by any variable, and zarr's default format 3. The
    probe records (`RecordStore._dataset`, and a truncate's reloaded steps) are laid out so."""
    import zarr

    if zarr.config.get("default_zarr_format") != 3 or not _plain_attrs(ds.attrs):
        return False
    for name, var in ds.variables.items():
        if var.encoding or not _plain_attrs(var.attrs) or "_FillValue" in var.attrs:
            return False
        if name in ds.data_vars:
            if var.dtype != np.float32 or set(encoding.get(name, {})) - {"chunks"}:
                return False
        elif var.dims != (name,) or not (var.dtype == np.int64 or var.dtype.kind == "U") or name in encoding:
            return False
    return True


def _plain_attrs(attrs: dict) -> bool:
    return all(isinstance(key, str) and type(value) in _PLAIN_ATTR for key, value in attrs.items())


async def _create_direct(store: Any, ds: xr.Dataset, encoding: dict[str, dict]) -> None:
    """Create every array of `ds` in `store` with xarray's metadata for it (shape, dtype, chunks: the
    encoding's or the whole array; fill value NaN and the `_FillValue` attribute for floats, zarr's
    default otherwise; dimension names; attributes), write its values, all arrays concurrently, then
    the consolidated metadata. Only for datasets that pass `_direct_layout`."""
    root = await zarr_async.open_group(store=store, mode="w-", zarr_format=3, attributes=dict(ds.attrs))

    async def create(name: str) -> None:
        var = ds.variables[name]
        floating = var.dtype.kind == "f"
        array = await root.create_array(
            name, shape=var.shape, dtype=var.dtype, chunks=encoding.get(name, {}).get("chunks", var.shape),
            fill_value=np.nan if floating else None, dimension_names=var.dims,
            attributes={**var.attrs, "_FillValue": _NAN_FILL_ATTR} if floating else dict(var.attrs),
            config={"write_empty_chunks": True})
        await array.setitem(slice(None), var.values)

    await asyncio.gather(*(create(name) for name in ds.variables))
    await zarr_async.consolidate_metadata(store)
