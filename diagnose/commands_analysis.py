"""The analysis commands of `diagnose`: report, compare and check (click Command objects).

They only read run dirs, through `analyses` (no torch). Heavy imports (xarray, pandas, matplotlib)
happen inside each command so that `diagnose --help` stays fast. Bad input (a path that is not a run
dir, runs that cannot be combined, a sweep that does not vary what an analysis needs) ends in one
line on stderr and exit status 2; `check` exits 1 when a verdict is not the expected one.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import click

_DIRS_HELP = "Run dirs and/or sweep dirs (searched for run dirs)."


class AnalysisFailed(click.ClickException):
    """Bad input to an analysis command: printed as one line, exit status 2 (1 is a failed check)."""

    exit_code = 2


@contextlib.contextmanager
def _missing_data_as_lines():
    """Show the analyses' MissingDataWarning as one "warning: ..." line each on stderr (no source echo)."""
    import warnings

    from analyses.load import MissingDataWarning

    # Only MissingDataWarning is rerouted, as it is raised: recording every warning (record=True)
    # kept numpy's per-call RuntimeWarnings on NaN records too and made a damaged report crawl.
    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.simplefilter("always", MissingDataWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, MissingDataWarning):
                click.echo(f"warning: {message}", err=True)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


@contextlib.contextmanager
def _one_line_errors():
    """Turn the analyses' input errors (and unreadable files) into one clean line, no traceback."""
    from analyses.load import AnalysisError

    try:
        yield
    except AnalysisError as err:
        raise AnalysisFailed(str(err)) from None
    except OSError as err:
        raise AnalysisFailed(f"{err.filename or ''}: {err.strerror or err}") from None


def _boot_options(fn):
    # Applied bottom-up, so --help lists them in the reverse of this order.
    fn = click.option("--min-step", type=click.IntRange(min=0), default=1, show_default=True,
                      help="First probe step averaged into the linearization ratio (step 0: Adam's first update).")(fn)
    fn = click.option("--seed", "boot_seed", type=int, default=0, show_default=True,
                      help="Seed of the bootstrap's random generator (learning-rate transfer intervals).")(fn)
    fn = click.option("--n-boot", type=click.IntRange(min=10), default=1000, show_default=True,
                      help="Bootstrap resamples for the transfer intervals (laziness uses a t interval).")(fn)
    return fn


@click.command("report")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the figures, summary.md and summary.json (default: <first DIR>/report).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout (files are still written).")
@click.option("--dpi", type=click.IntRange(min=20), default=110, show_default=True,
              help="Resolution of the PNG figures.")
@_boot_options
def report(dirs: tuple[Path, ...], out: Path | None, as_json: bool, dpi: int, n_boot: int, boot_seed: int,
           min_step: int) -> None:
    """Figures and summary.md for runs and sweeps.

    Analyses the runs in DIRS: laziness slopes and verdicts, depth and width coordinate checks,
    learning-rate transfer and where learning happens, each where the sweep varies what it needs
    (the others are listed as skipped). Exit 2 on bad input.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window
    from analyses.report import write_report

    out = out if out is not None else dirs[0] / "report"
    with _one_line_errors(), _missing_data_as_lines():
        summary = write_report(list(dirs), out, n_boot=n_boot, seed=boot_seed, window=(min_step, None), dpi=dpi)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{len(summary['runs'])} run(s); report in {out}")
    for label, entry in summary.get("laziness", {}).items():
        stability = f", {entry['stability']}" if entry.get("stability") else ""
        estimates = ", ".join(
            f"{b} {_interval(e.get('alpha_hat'), e.get('alpha_hat_ci_low'), e.get('alpha_hat_ci_high'))}"
            for b, e in entry["branches"].items())
        click.echo(f"  {label}: {entry['verdict']}{stability} (α̂ {estimates})")
    for name, why in summary.get("skipped", {}).items():
        click.echo(f"  skipped {name}: {why}", err=True)


def _interval(value, low, high) -> str:
    """'0.96 [0.90, 1.02]' (JSON nulls, i.e. NaN, as '–')."""
    def fmt(v):
        return "–" if v is None else f"{v:.2f}"
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


@click.command("compare")
@click.argument("dir_a", type=click.Path(path_type=Path))
@click.argument("dir_b", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON (metric → {a, b, b/a}).")
def compare(dir_a: Path, dir_b: Path, as_json: bool) -> None:
    """Two runs side by side.

    Key metrics of DIR_A and DIR_B: final losses, linearization ratios, final-stream size, feature
    updates at the last probe step and how evenly layers learn. Exit 2 when the runs record
    different variables or schema versions.
    """
    import pandas as pd

    from analyses.report import compare_runs

    with _one_line_errors(), _missing_data_as_lines():
        table = compare_runs(dir_a, dir_b)
    if as_json:
        clean = table.astype(object).where(pd.notna(table), None)
        click.echo(json.dumps(clean.to_dict(orient="index"), indent=2, default=str))
        return
    click.echo(f"a: {dir_a}\nb: {dir_b}")
    with pd.option_context("display.width", 200, "display.max_rows", 200, "display.float_format", "{:.5g}".format):
        click.echo(table.to_string())


@click.command("check")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--expect", type=click.Choice(["complete", "lazy", "inconclusive", "not-lazy", "unstable"]),
              required=True,
              help="The verdict every checked parameterization must get (α: complete, lazy, inconclusive; sp/mup: "
                   "not-lazy, or unstable when their final stream grows with depth).")
@click.option("--param", "params", multiple=True, metavar="LABEL",
              help="Check only this parameterization (sp, mup, alpha=0.5, alpha=1, completep, depth-mup); "
                   "repeatable. Default: every one in the sweep.")
@_boot_options
def check(dirs: tuple[Path, ...], expect: str, params: tuple[str, ...], n_boot: int, boot_seed: int,
          min_step: int) -> None:
    """Assert a laziness verdict (exit 1 if not met).

    Fits the slope of the linearization ratio vs depth, with a Student-t interval over runs, for each
    parameterization in DIRS and compares its verdict with --expect: exit 0 when all match, 1
    (saying why) when one does not, 2 on bad input (e.g. runs at a single depth, or a store with
    recorded steps whose chunk files are missing on disk).
    """
    from analyses.laziness import expectation_met, laziness, param_verdicts, stream_trends
    from analyses.load import AnalysisError, normalize_label, open_sweep

    with _one_line_errors():
        with _missing_data_as_lines():
            ds = open_sweep(list(dirs))
        if ds.attrs.get("missing_data"):  # a verdict from records that read partly as NaN is not one to trust
            raise AnalysisFailed(f"cannot check: {len(ds.attrs['missing_data'])} store variable(s) have recorded "
                                 "steps missing on disk (listed above); restore or re-record them")
        table = laziness(ds, window=(min_step, None))
        verdicts = param_verdicts(table, stream_trends(ds))
        wanted = [normalize_label(p) for p in params] or list(verdicts["param"])
        missing = [p for p in wanted if p not in set(verdicts["param"])]
        if missing:
            raise AnalysisError(f"no runs for {', '.join(missing)}; the sweep has {', '.join(verdicts['param'])}")
    failed = False
    for _, row in verdicts[verdicts["param"].isin(wanted)].iterrows():
        ok = expectation_met(row, expect)
        failed |= not ok
        mark = "ok" if ok else "FAIL"
        got = row["verdict"] + (f", {row['stability']}" if row["stability"] else "")
        click.echo(f"{mark}: {row['param']} is {got} (expected {expect}): {row['reason']}")
    if failed:
        click.get_current_context().exit(1)
