"""Opening run dirs and sweeps: validation, identity, the outer join, metrics parsing."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import numpy as np
import pytest
import xarray as xr

from analyses import load
from analyses.load import IncompatibleRunsError, NotARunError
from probes import schema
from tests.analyses.conftest import SynthRun, probe_dataset, write_run


@pytest.mark.parametrize(
    ("param", "alpha", "label"),
    [("sp", math.nan, "sp"), ("mup", None, "mup"), ("alpha", 0.5, "alpha=0.5"), ("alpha", 1.0, "alpha=1"),
     ("alpha", 0.75, "alpha=0.75")],
)
def test_param_label_roundtrip(param, alpha, label):
    assert load.param_label(param, alpha) == label
    p, a = load.parse_param_label(label)
    assert p == param and (math.isnan(a) if param != "alpha" else a == alpha)


def test_label_aliases_and_order():
    assert load.normalize_label("completep") == "alpha=1"
    assert load.normalize_label("Depth-muP") == "alpha=0.5"
    assert load.normalize_label("alpha=1.0") == "alpha=1"
    assert sorted(["alpha=1", "sp", "alpha=0.5", "mup"], key=load.label_sort_key) == ["sp", "mup", "alpha=0.5",
                                                                                     "alpha=1"]
    with pytest.raises(load.AnalysisError, match="unknown parameterization"):
        load.parse_param_label("ntk")


def test_open_run_reads_appended_store(one_run):
    ds = load.open_run(one_run)
    # The builder writes the steps in two to_zarr calls (first write + append), as the trainer does.
    assert ds["step"].values.tolist() == [0, 1, 2, 4, 8, 16]
    assert ds.attrs["param_label"] == "alpha=1" and ds.attrs["run_dir"] == str(one_run)
    ref = probe_dataset(SynthRun(depth=4, share_decay=0.5))
    np.testing.assert_allclose(ds["lin_ratio"].values, ref["lin_ratio"].values)
    assert set(ds.data_vars) == set(schema.VARIABLES) - set(schema.LINEARIZED_VARIABLES)


def test_not_a_run_errors_name_path_and_what_is_missing(tmp_path):
    with pytest.raises(NotARunError, match="no such file"):
        load.open_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotARunError, match=r"empty.*no probes\.zarr"):
        load.open_run(tmp_path / "empty")
    with pytest.raises(NotARunError, match="no run dirs below it"):
        load.find_runs(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotARunError, match="file.txt"):
        load.find_runs(tmp_path / "file.txt")


def _rewrite_attrs(run, **attrs):
    store = run / schema.STORE_NAME
    ds = xr.open_dataset(store, engine="zarr", chunks=None).load()
    ds.attrs.update(attrs)
    for k in [k for k, v in attrs.items() if v is None]:
        del ds.attrs[k]
    shutil.rmtree(store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.to_zarr(store, mode="w")


def test_schema_version_and_attrs_checked(tmp_path):
    run = write_run(tmp_path / "r", SynthRun(blocks=1, variables=("lin_ratio",)))
    _rewrite_attrs(run, schema_version=99)
    with pytest.raises(IncompatibleRunsError, match="schema_version 99"):
        load.open_run(run)
    _rewrite_attrs(run, schema_version=schema.SCHEMA_VERSION, depth=None)
    with pytest.raises(NotARunError, match="lacks the run attributes depth"):
        load.open_run(run)


def test_find_runs_nested_and_deduplicated(tmp_path):
    a = write_run(tmp_path / "sweep" / "a", SynthRun(blocks=1, variables=("lin_ratio",)))
    b = write_run(tmp_path / "sweep" / "group" / "b", SynthRun(seed=1, blocks=1, variables=("lin_ratio",)))
    assert load.find_runs([tmp_path / "sweep", a]) == [a, b]


def test_open_sweep_outer_join_pads_layers_and_steps(tmp_path):
    keep = ("lin_ratio", "final_abs_mean")
    write_run(tmp_path / "s" / "shallow", SynthRun(depth=2, steps=(0, 1, 2), blocks=1, variables=keep))
    write_run(tmp_path / "s" / "deep", SynthRun(depth=4, steps=(0, 2, 5), blocks=1, variables=keep))
    write_run(tmp_path / "s" / "sp", SynthRun(param="sp", depth=4, steps=(0, 2, 5), blocks=1, variables=keep))
    ds = load.open_sweep(tmp_path / "s")
    assert ds["step"].values.tolist() == [0, 1, 2, 5]
    assert ds["layer"].values.tolist() == [0, 1, 2, 3]
    assert ds["param"].values.tolist() == ["sp", "alpha=1"]  # label order, not alphabetical
    assert np.isnan(ds["alpha"].sel(param="sp")) and ds["alpha"].sel(param="alpha=1") == 1.0
    shallow = ds["lin_ratio"].sel(param="alpha=1", depth=2).squeeze()
    assert np.isnan(shallow.sel(layer=[2, 3])).all() and np.isnan(shallow.sel(step=5)).all()
    assert np.isfinite(shallow.sel(layer=[0, 1], step=[0, 1, 2])).all()
    assert np.isnan(ds["final_abs_mean"].sel(param="sp", depth=2)).all()  # a combination never run
    runs = load.list_runs(ds)
    assert len(runs) == 3 and set(runs["state"]) == {"finished"}
    assert load.sweep_values(ds, "depth") == [2, 4]


def test_open_sweep_incompatible_runs(tmp_path):
    write_run(tmp_path / "a" / "x", SynthRun(blocks=1, variables=("lin_ratio",)))
    write_run(tmp_path / "a" / "y", SynthRun(blocks=1, variables=("lin_ratio",)))
    with pytest.raises(IncompatibleRunsError, match="same sweep point"):
        load.open_sweep(tmp_path / "a")
    write_run(tmp_path / "b" / "x", SynthRun(blocks=1, variables=("lin_ratio",)))
    write_run(tmp_path / "b" / "y", SynthRun(seed=1, blocks=1, variables=("final_rms",)))
    with pytest.raises(IncompatibleRunsError, match="no probe variable in common"):
        load.open_sweep(tmp_path / "b")
    write_run(tmp_path / "c" / "x", SynthRun(blocks=1, variables=("lin_ratio",)))
    write_run(tmp_path / "c" / "y", SynthRun(seed=1, blocks=1, variables=("lin_ratio", "final_rms")))
    with pytest.warns(UserWarning, match="final_rms"):
        ds = load.open_sweep(tmp_path / "c")
    assert list(ds.attrs["dropped_variables"]) == ["final_rms"] and "final_rms" not in ds


def test_as_sweep_restores_selected_dims(tmp_path):
    run = write_run(tmp_path / "r", SynthRun(blocks=1, variables=("lin_ratio",)))
    one = load.as_sweep(load.open_run(run))
    assert all(one.sizes[d] == 1 for d in load.SWEEP_DIMS)
    assert load.list_runs(one)["run_dir"].tolist() == [str(run)]
    again = load.as_sweep(one.sel(depth=4, param="alpha=1"))
    assert again["lin_ratio"].dims[:5] == load.SWEEP_DIMS


def test_load_metrics_merges_val_lines_torn_line_and_resumed_steps(tmp_path):
    rows = [{"step": 0, "loss": 3.0, "lr": 0.1, "grad_norm": 1, "tokens_per_s": 10},
            {"step": 0, "val_loss": 3.1},  # the trainer's validation line for step 0
            {"step": 1, "loss": 2.5, "lr": 0.1, "grad_norm": 1, "tokens_per_s": 10},
            {"step": 1, "loss": 2.4, "lr": 0.1, "grad_norm": 1, "tokens_per_s": 10}]  # resumed: step 1 again
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"step": 2, "loss'
    (tmp_path / schema.METRICS_NAME).write_text(text)
    df = load.load_metrics(tmp_path)
    assert df["step"].tolist() == [0, 1]
    assert df["loss"].tolist() == [3.0, 2.4]
    assert df["val_loss"].iloc[0] == 3.1 and np.isnan(df["val_loss"].iloc[1])
    assert df["lr"].tolist() == [0.1, 0.1] and df.attrs["nonfinite_loss"] == []
    (tmp_path / schema.METRICS_NAME).write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": NaN}\n'
                                                '{"step": 2, "val_loss": 2.0}\n')
    df = load.load_metrics(tmp_path)
    assert df.attrs["nonfinite_loss"] == [1] and np.isnan(df["loss"].iloc[2])  # step 2: validation only
    (tmp_path / schema.METRICS_NAME).write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(NotARunError, match="line 2"):
        load.load_metrics(tmp_path)
    assert load.load_metrics(tmp_path / "missing").empty
    assert load.load_status(tmp_path) == {"state": "unknown"}


# --- damaged stores: chunk files missing on disk --------------------------------------------------------


def _write_blocks(path, ds, blocks, status=None):
    """Write `ds` as a run's store in the given step blocks (first write + appends, as the trainer does)."""
    path.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, idx in enumerate(blocks):
            ds.isel(step=idx).to_zarr(path / schema.STORE_NAME, mode="w" if i == 0 else None,
                                      append_dim=None if i == 0 else "step")
    if status is not None:
        (path / schema.STATUS_NAME).write_text(json.dumps(status))
    return path


def test_missing_chunk_is_found_with_its_variable_and_steps(tmp_path):
    spec = SynthRun(variables=("lin_ratio", "final_rms"))  # steps 0, 1, 2, 4, 8, 16
    run = _write_blocks(tmp_path / "r", probe_dataset(spec), [[0, 1, 2], [3, 4, 5]])
    assert load.missing_data(run) == []
    assert load.open_run(run).attrs["missing_data"] == []
    # The first write fixes the chunk length at 3 steps: the second block is chunk 1 along step.
    (run / schema.STORE_NAME / "lin_ratio" / "c" / "1" / "0" / "0").unlink()
    found = load.missing_data(run)
    assert found == [{"variable": "lin_ratio", "steps": [4, 8, 16], "chunks": ["lin_ratio/c/1/0/0"]}]
    with pytest.warns(load.MissingDataWarning, match=r"lin_ratio has no data on disk for recorded step\(s\) 4, 8, 16"):
        ds = load.open_run(run)
    assert len(ds.attrs["missing_data"]) == 1 and np.isnan(ds["lin_ratio"].sel(step=8)).all()
    with pytest.warns(load.MissingDataWarning):
        sweep = load.open_sweep(tmp_path)
    assert sweep.attrs["missing_data"] == ds.attrs["missing_data"]
    # A lost chunk of the step coordinate itself (it would read as step 0, its fill value).
    (run / schema.STORE_NAME / "step" / "c" / "1").unlink()
    assert {m["variable"] for m in load.missing_data(run)} == {"lin_ratio", "step"}


def test_chunks_zarr_leaves_unwritten_because_all_nan_are_not_damage(tmp_path):
    # zarr 3 writes no file for an all-NaN chunk. Two cases where all-NaN is legitimate:
    # the first probe step alone (final_update_share is NaN there by definition) ...
    spec = SynthRun(variables=("final_update_share", "final_rms"))
    first = _write_blocks(tmp_path / "first", probe_dataset(spec), [[0], [1, 2], [3, 4, 5]])
    assert not (first / schema.STORE_NAME / "final_update_share" / "c" / "0" / "0").exists()
    assert load.missing_data(first) == []
    # ... and the steps after the trainer's NaN stop (bad_step 4): records there are NaN.
    ds = probe_dataset(spec)
    ds["final_rms"][3:] = np.nan
    status = {"state": "failed", "step": 5, "bad_step": 4}
    after = _write_blocks(tmp_path / "after", ds, [[0, 1, 2], [3, 4, 5]], status)
    assert not (after / schema.STORE_NAME / "final_rms" / "c" / "1").exists()
    assert load.missing_data(after) == []
    # Without the NaN stop the same absent chunk is damage: the run recorded those steps ...
    (after / schema.STATUS_NAME).write_text(json.dumps({"state": "finished", "step": 5}))
    assert load.missing_data(after)[0]["steps"] == [4, 8, 16]
    # ... unless the run is still running: an append resizes the arrays before it writes the last chunk.
    (after / schema.STATUS_NAME).write_text(json.dumps({"state": "running", "step": 5}))
    assert load.missing_data(after) == []
    # A store that says it writes every chunk (probes.store does) gets no allowance: absent is damage.
    marked = probe_dataset(spec)
    marked.attrs["write_empty_chunks"] = True
    marked = _write_blocks(tmp_path / "marked", marked, [[0], [1, 2], [3, 4, 5]])  # written here without it
    # (the one-step chunk of the step coordinate, all zeros = its fill value, is absent too)
    assert {m["variable"] for m in load.missing_data(marked)} == {"final_update_share", "step"}


def test_a_corrupt_chunk_is_one_clear_error(tmp_path):
    run = write_run(tmp_path / "r", SynthRun(blocks=1, variables=("lin_ratio",)))
    (run / schema.STORE_NAME / "lin_ratio" / "c" / "0" / "0" / "0").write_bytes(b"\x00garbage")
    with pytest.raises(NotARunError, match=r"probes\.zarr: a record cannot be read"):
        load.open_run(run)


@pytest.fixture(scope="module")
def real_run_pair(tmp_path_factory):
    """A real tiny run (trainer + probes) and a copy of it with one chunk file of lin_ratio deleted."""
    torch = pytest.importorskip("torch")
    from probes.recorder import ProbeConfig, ProbeRecorder
    from tests.probes.conftest import tiny_spec
    from trainer.loop import Trainer

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("damaged")
    intact = root / "intact"
    spec = tiny_spec(steps=4)
    probes = ProbeRecorder(ProbeConfig(every=1, batch_size=2, lin_batch_size=1), intact, spec)
    Trainer(spec, intact, observers=[probes], quiet=True).run()
    damaged = root / "damaged"
    shutil.copytree(intact, damaged)
    chunks = sorted((damaged / schema.STORE_NAME / "lin_ratio" / "c").rglob("*"))
    files = [p for p in chunks if p.is_file()]
    assert len(files) == 1  # 4 probe steps: one chunk along step
    files[0].unlink()
    return intact, damaged


def _diagnose(*args):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-m", "diagnose", *map(str, args)], cwd=repo, capture_output=True,
                          text=True, timeout=180)


def test_report_and_check_on_a_real_store_with_a_deleted_chunk(real_run_pair, tmp_path):
    from analyses.report import summarize

    intact, damaged = real_run_pair
    assert load.missing_data(intact) == []
    assert summarize(intact, n_boot=10)["missing_data"] == []
    done = _diagnose("report", damaged, "--json", "--out", tmp_path / "rep")
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "lin_ratio" in warning[0] and "recorded step(s) 0, 1, 2, 3" in warning[0]
    assert json.loads(done.stdout)["missing_data"] == [warning[0].removeprefix("warning: ")]
    assert "## Warning: missing data" in (tmp_path / "rep" / "summary.md").read_text()
    done = _diagnose("check", damaged, "--expect", "complete")
    assert done.returncode == 2 and "cannot check" in done.stderr and "lin_ratio" in done.stderr
