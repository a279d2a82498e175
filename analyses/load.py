"""Open run dirs and sweeps of run dirs as xarray Datasets; read a run's metrics and status.

A *run dir* is what one training run writes (see `probes.schema` for the names): `probes.zarr` (the
probe records, appended along `step`), `metrics.jsonl` (one JSON object per training step),
`status.json` and `config.json`. A *sweep dir* holds run dirs as subfolders. Everything here is
torch-free: it reads files only.

The sweep Dataset that `open_sweep` returns has the probe variables with the sweep dims in front:
``(param, depth, width, seed, lr, step, layer, ...)``. `param` holds labels from `param_label`
("sp", "mup", "alpha=0.5", "alpha=1"); a coordinate `alpha` along `param` gives α (NaN for sp/mup).
Combinations that were not run, steps a run did not probe and layers deeper than a run's model are
NaN. Two extra variables over the sweep dims, `run_dir` and `state`, say where each cell came from.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from probes import schema

SWEEP_DIMS: tuple[str, ...] = ("param", "depth", "width", "seed", "lr")
METRIC_COLUMNS: tuple[str, ...] = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "val_loss")
# Friendly names a user may type for a parameterization (the CLI's --param), mapped to labels.
PARAM_ALIASES: dict[str, str] = {"completep": "alpha=1", "depth-mup": "alpha=0.5", "depthmup": "alpha=0.5"}


class AnalysisError(ValueError):
    """Base of the errors that mean "bad input", as opposed to a bug: the CLI prints them in one line."""


class NotARunError(AnalysisError):
    """A path is not a (readable) run dir; the message names the path and what is missing."""


class IncompatibleRunsError(AnalysisError):
    """Runs cannot be combined or compared: different schema versions or variable sets, duplicates."""


class InsufficientSweepError(AnalysisError):
    """The sweep does not vary what an analysis needs (e.g. a depth slope from a single depth)."""


# --- parameterization labels ------------------------------------------------------------------------


def param_label(param: str, alpha: float | None = None) -> str:
    """The sweep label of a parameterization: "sp", "mup", or "alpha=<α>" ("alpha=0.5", "alpha=1")."""
    if param in ("sp", "mup"):
        return param
    if param != "alpha":
        raise NotARunError(f"unknown parameterization {param!r}: expected 'sp', 'mup' or 'alpha'")
    if alpha is None or not math.isfinite(float(alpha)):
        raise NotARunError("parameterization 'alpha' needs a finite alpha attribute")
    return f"alpha={float(alpha):g}"


def parse_param_label(label: str) -> tuple[str, float]:
    """Inverse of `param_label`, also accepting the aliases "completep" and "depth-mup": (param, α).

    α is NaN for sp and mup.
    """
    label = PARAM_ALIASES.get(label.strip().lower(), label.strip().lower())
    if label in ("sp", "mup"):
        return label, math.nan
    if label.startswith("alpha="):
        try:
            return "alpha", float(label.split("=", 1)[1])
        except ValueError:
            pass
    raise AnalysisError(f"unknown parameterization label {label!r}: expected sp, mup, alpha=<α> or completep")


def normalize_label(label: str) -> str:
    """Canonical form of a label a user typed ("completep" → "alpha=1", "alpha=1.0" → "alpha=1")."""
    return param_label(*parse_param_label(label))


def label_sort_key(label: str) -> tuple[int, float]:
    """Order labels as sp, mup, then α ascending (the order of the paper's figures)."""
    param, alpha = parse_param_label(label)
    return ({"sp": 0, "mup": 1}.get(param, 2), 0.0 if math.isnan(alpha) else alpha)


# --- finding runs -------------------------------------------------------------------------------------


def is_run_dir(path: str | os.PathLike) -> bool:
    """True when `path` holds a probe store (the one file every analysed run needs)."""
    return (Path(path) / schema.STORE_NAME).is_dir()


def find_runs(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Run dirs under `paths`: each path is a run dir itself or a sweep dir searched recursively.

    The search does not descend into run dirs (their checkpoints and stores are not runs) and
    returns each run once, in sorted order. Raises NotARunError for a path that does not exist or
    holds no run.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise NotARunError(f"{path}: no such file or directory")
        if is_run_dir(path):
            found[path] = None
            continue
        if not path.is_dir():
            raise NotARunError(f"{path}: not a run dir (expected a folder holding {schema.STORE_NAME})")
        hits = []
        for root, dirs, _files in os.walk(path):
            if is_run_dir(root):
                hits.append(Path(root))
                dirs.clear()  # a run dir's subfolders are its own files, not more runs
            else:
                dirs[:] = [d for d in dirs if not d.endswith(".zarr") and not d.startswith(".")]
        if not hits:
            raise NotARunError(
                f"{path}: not a run dir and no run dirs below it (a run dir holds {schema.STORE_NAME})"
            )
        found.update(dict.fromkeys(sorted(hits)))
    return list(found)


# --- one run -------------------------------------------------------------------------------------------


def _open_store(path: Path) -> xr.Dataset:
    store = path / schema.STORE_NAME
    if not path.exists():
        raise NotARunError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise NotARunError(f"{path}: not a run dir (a file; a run dir is a folder holding {schema.STORE_NAME})")
    if not store.is_dir():
        raise NotARunError(f"{path}: not a run dir (no {schema.STORE_NAME} in it)")
    try:
        with warnings.catch_warnings():
            # A store written without consolidated metadata is fine; xarray warns while falling back.
            warnings.simplefilter("ignore", RuntimeWarning)
            return xr.open_dataset(store, engine="zarr", chunks=None)
    except Exception as err:  # zarr raises many types for a broken store; name the store, not them
        raise NotARunError(f"{store}: cannot be opened as a zarr store ({type(err).__name__}: {err})") from err


def _identity(path: Path, attrs: dict) -> dict:
    """The run's sweep coordinates from the store attrs, with types checked."""
    missing = [k for k in (*schema.SWEEP_ATTRS, "schema_version") if k not in attrs]
    if missing:
        raise NotARunError(f"{path}: {schema.STORE_NAME} lacks the run attributes {', '.join(missing)}")
    version = int(attrs["schema_version"])
    if version != schema.SCHEMA_VERSION:
        raise IncompatibleRunsError(
            f"{path}: records have schema_version {version}, this reader understands {schema.SCHEMA_VERSION}"
        )
    alpha = attrs["alpha"]
    alpha = math.nan if alpha is None or alpha == "NaN" else float(alpha)
    try:
        label = param_label(str(attrs["param"]), alpha)
    except NotARunError as err:
        raise NotARunError(f"{path}: {err}") from None
    try:
        ident = {"depth": int(attrs["depth"]), "width": int(attrs["width"]), "seed": int(attrs["seed"]),
                 "lr": float(attrs["lr"])}
    except (TypeError, ValueError) as err:
        raise NotARunError(f"{path}: a run attribute is not a number ({err})") from None
    # They index the sweep: a NaN or zero would make an empty coordinate, not a run.
    for key in ("depth", "width", "lr"):
        if not (math.isfinite(ident[key]) and ident[key] > 0):
            raise NotARunError(f"{path}: run attribute {key}={attrs[key]!r} must be a positive number")
    return {"param": label, "alpha": alpha, **ident, "schema_version": version}


def run_identity(path: str | os.PathLike) -> dict:
    """A run's sweep coordinates {param (label), alpha, depth, width, seed, lr, schema_version}.

    Reads only the store's attributes (a few ms), not the records.
    """
    path = Path(path)
    try:
        import zarr  # the group's attributes are the Dataset's attrs, without decoding every array

        attrs = dict(zarr.open_group(path / schema.STORE_NAME, mode="r").attrs)
    except Exception:  # not a zarr group, or another layout: let the full open name the problem
        with _open_store(path) as ds:
            attrs = dict(ds.attrs)
    return _identity(path, attrs)


def open_run(path: str | os.PathLike) -> xr.Dataset:
    """Load one run's probe records into memory, after checking that it is a usable run dir.

    Returns the store's Dataset (dims `step`, `layer`, `site`, ...; variables as in
    `probes.schema.VARIABLES`) with attrs extended by `run_dir` (str) and `param_label`.
    Raises NotARunError (not a run dir, no steps recorded yet, missing attributes) or
    IncompatibleRunsError (another schema version, a variable with unexpected dims).
    """
    path = Path(path)
    ds = _open_store(path)
    ident = _identity(path, dict(ds.attrs))
    if "step" not in ds.dims or ds.sizes["step"] == 0:
        raise NotARunError(f"{path}: {schema.STORE_NAME} holds no probe steps yet")
    for name, var in schema.VARIABLES.items():
        if name in ds and ds[name].dims != ("step", *var.dims):
            raise IncompatibleRunsError(
                f"{path}: variable {name} has dims {ds[name].dims}, schema says {('step', *var.dims)}"
            )
    ds = ds.load().sortby("step")
    ds.attrs.update(run_dir=str(path), param_label=ident["param"])
    return ds


def load_status(run: str | os.PathLike) -> dict:
    """The run's status.json as a dict; {"state": "unknown"} when it is missing or unreadable."""
    try:
        status = json.loads((Path(run) / schema.STATUS_NAME).read_text())
    except (OSError, ValueError):
        return {"state": "unknown"}
    return status if isinstance(status, dict) else {"state": "unknown"}


def load_metrics(run: str | os.PathLike) -> pd.DataFrame:
    """The run's per-step training metrics as a DataFrame sorted by step, one row per step.

    Columns: step (int), loss, lr, grad_norm, tokens_per_s (floats), val_loss (NaN at steps
    without validation; loss NaN at a step that has only a validation), plus any extra keys the
    trainer wrote. Lines with the same step are merged, the later line winning per column: the
    trainer writes a validation as its own line {"step", "val_loss"}, and a resumed run may repeat
    steps after its checkpoint. A torn last line (a run killed while writing) is skipped. A missing
    file gives an empty frame. `df.attrs["nonfinite_loss"]` lists the steps whose written training
    loss was NaN or inf (a divergence), which the merged NaNs of validation-only steps would hide.
    """
    path = Path(run) / schema.METRICS_NAME
    if not path.is_file():
        return pd.DataFrame({c: pd.Series(dtype="int64" if c == "step" else "float64") for c in METRIC_COLUMNS})
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as err:
            if i == len(lines) - 1:
                continue
            raise NotARunError(f"{path}: line {i + 1} is not JSON ({err})") from None
    nonfinite = sorted({int(r["step"]) for r in rows if "loss" in r and "step" in r
                        and not (isinstance(r["loss"], (int, float)) and math.isfinite(r["loss"]))})
    df = pd.DataFrame(rows)
    for col in METRIC_COLUMNS:
        if col not in df:
            df[col] = np.nan
    df = df.dropna(subset=["step"]).astype({"step": "int64"})
    # groupby().last() takes each column's last non-null value: merges val lines into their step.
    df = df.groupby("step", sort=True).last().reset_index()
    other = [c for c in df.columns if c not in METRIC_COLUMNS]
    df = df[list(METRIC_COLUMNS) + other]
    df.attrs["nonfinite_loss"] = nonfinite
    return df


# --- many runs ------------------------------------------------------------------------------------------


def _sort_sweep(ds: xr.Dataset) -> xr.Dataset:
    labels = sorted((str(v) for v in ds["param"].values), key=label_sort_key)
    ds = ds.reindex(param=labels).sortby(["depth", "width", "seed", "lr"])
    return ds.assign_coords(alpha=("param", [parse_param_label(v)[1] for v in labels]))


def as_sweep(ds: xr.Dataset) -> xr.Dataset:
    """A one-run Dataset (from `open_run`) with the sweep dims added; a sweep Dataset is returned as is.

    A sweep on which `.sel(depth=8)` dropped some sweep dims (kept as scalar coordinates) gets them
    back as dims of size 1.
    """
    if all(d in ds.dims for d in SWEEP_DIMS):
        return ds
    if all(d in ds.coords for d in SWEEP_DIMS):
        scalar = [d for d in SWEEP_DIMS if d not in ds.dims]
        ds = ds.expand_dims(scalar)
        if "alpha" in ds.coords and "param" not in ds["alpha"].dims:
            ds = ds.assign_coords(alpha=("param", np.atleast_1d(ds["alpha"].values)))
        return ds.transpose(*SWEEP_DIMS, ...)
    ident = _identity(Path(ds.attrs.get("run_dir", "<dataset>")), dict(ds.attrs))
    run_dir = ds.attrs.get("run_dir", "")
    state = load_status(run_dir).get("state", "unknown") if run_dir else "unknown"
    ds = ds.assign(run_dir=((), run_dir), state=((), state))
    ds = ds.expand_dims({d: [ident[d]] for d in reversed(SWEEP_DIMS)})
    ds.attrs = {"schema_version": ident["schema_version"], "n_runs": 1}
    return _sort_sweep(ds)


def open_sweep(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> xr.Dataset:
    """Open every run under `paths` (run dirs and/or sweep dirs) as one Dataset over the sweep dims.

    Runs are combined with an outer join: the union of probe steps, of layers (NaN above a shallow
    model's depth) and of optimizer groups. Variables that some runs lack are dropped with a
    warning (their names go to attrs["dropped_variables"]). Raises IncompatibleRunsError for runs
    with different schema versions, with no variable in common, or two runs with the same
    (param, depth, width, seed, lr).
    """
    runs = find_runs(paths)
    datasets = [open_run(p) for p in runs]
    versions = {int(ds.attrs["schema_version"]) for ds in datasets}
    if len(versions) > 1:
        raise IncompatibleRunsError(f"runs mix schema versions {sorted(versions)}; re-record or open them apart")
    names = [set(ds.data_vars) for ds in datasets]
    common = set.intersection(*names)
    if not common:
        raise IncompatibleRunsError(
            "runs have no probe variable in common: " + "; ".join(f"{p}: {sorted(n)}" for p, n in zip(runs, names))
        )
    dropped = sorted(set.union(*names) - common)
    if dropped:
        warnings.warn(f"variables missing from some runs are dropped: {', '.join(dropped)}", stacklevel=2)

    cells = []
    seen: dict[tuple, Path] = {}
    for path, ds in zip(runs, datasets):
        ident = _identity(path, dict(ds.attrs))
        key = tuple(ident[d] for d in SWEEP_DIMS)
        if key in seen:
            raise IncompatibleRunsError(
                f"{seen[key]} and {path} are the same sweep point {dict(zip(SWEEP_DIMS, key))}"
            )
        seen[key] = path
        cell = ds[sorted(common)]
        cell.attrs = {}
        state = load_status(path).get("state", "unknown")
        cell = cell.assign(run_dir=((), str(path)), state=((), str(state)))
        cells.append(cell.expand_dims("run").assign_coords({d: ("run", [ident[d]]) for d in SWEEP_DIMS}))

    # One concat (outer join on step/layer/group) then one unstack: the combinations not run become NaN.
    combined = xr.concat(
        cells, dim="run", join="outer", data_vars="all", coords="minimal", compat="override", fill_value=np.nan
    )
    combined = combined.set_index(run=list(SWEEP_DIMS)).unstack("run")
    combined = combined.transpose(*SWEEP_DIMS, ...)
    combined.attrs = {"schema_version": versions.pop(), "n_runs": len(runs)}
    if dropped:
        combined.attrs["dropped_variables"] = dropped
    return _sort_sweep(combined)


def list_runs(ds: xr.Dataset) -> pd.DataFrame:
    """The runs in a sweep Dataset: one row per run with its sweep coordinates, run_dir and state."""
    ds = as_sweep(ds)
    df = ds[["run_dir", "state"]].to_dataframe().reset_index()
    df = df[df["run_dir"].map(lambda v: isinstance(v, str) and v != "")]
    df = df.drop(columns=[c for c in df.columns if c not in (*SWEEP_DIMS, "alpha", "run_dir", "state")])
    return df.reset_index(drop=True)


def sort_by_param(df: pd.DataFrame, *others: str) -> pd.DataFrame:
    """`df` sorted by its `param` column in label order (sp, mup, α ascending), then by `others`."""
    order = {label: i for i, label in enumerate(sorted(df["param"].unique(), key=label_sort_key))}
    key = df["param"].map(order).rename("_order")
    out = df.assign(_order=key).sort_values(["_order", *others], kind="stable").drop(columns="_order")
    return out.reset_index(drop=True)


def sweep_values(ds: xr.Dataset, dim: str) -> list:
    """Values of a sweep dim at which at least one run exists."""
    runs = list_runs(ds)
    return sorted(runs[dim].unique().tolist(), key=label_sort_key if dim == "param" else None)
