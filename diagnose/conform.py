"""`diagnose conform` and `diagnose linearize`: wiring only (analyses.conformance, probes.linearized_model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from diagnose.commands_analysis import AnalysisFailed, _one_line_errors


@click.command("conform")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list of rows (quantity, axis, param, measured, ci_low, ci_high, predicted, status).")
@click.option("--quantity", "quantities", multiple=True, metavar="NAME",
              help="Check only this quantity (repeatable; see analyses.theory.QUANTITIES).")
@click.option("--n-boot", type=click.IntRange(min=10), default=1000, hidden=True,
              help="No effect (the intervals are no longer bootstrapped); kept so that old scripts run.")
@click.option("--seed", "boot_seed", type=int, default=0, hidden=True, help="No effect; kept so that old scripts run.")
def conform(dirs: tuple[Path, ...], as_json: bool, quantities: tuple[str, ...], n_boot: int, boot_seed: int) -> None:
    """Measured scaling exponents of a sweep against the parameterization's predictions.

    For every recorded quantity (per branch or role) and every axis the sweep varies (depth, width):
    the fitted log-log exponent with a 95% Student-t interval (least squares over the runs, one
    intercept per width/LR cell: seeds are the replicates), the predicted exponent
    (analyses/theory.py, `python -m analyses.theory`) and pass / fail / inconclusive. 1 − CKA is
    fitted only on probe steps where every run's feature change is below 0.3 (its second-order
    expansion's regime). Exit 1 when any row fails, 2 on bad input.
    """
    from analyses.conformance import conformance, failures, format_table, records
    from analyses.load import open_sweep
    from analyses.theory import QUANTITIES

    unknown = [q for q in quantities if q not in QUANTITIES]
    if unknown:
        raise AnalysisFailed(f"unknown --quantity {', '.join(unknown)}; known: {', '.join(QUANTITIES)}")
    with _one_line_errors():
        table = conformance(open_sweep(list(dirs)), quantities or None, n_boot=n_boot, seed=boot_seed)
    if as_json:
        click.echo(json.dumps(records(table), indent=2))
    else:
        click.echo(format_table(table))
    if not failures(table).empty:
        sys.exit(1)


@click.command("linearize")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Held-out sequences the surrogate is evaluated on.")
def linearize(run_dirs: tuple[Path, ...], batch_size: int) -> None:
    """Offline: the block-linearized model's losses at each run dir's checkpoint.

    Rebuilds θ_0 from the run's seed, evaluates the real, the block-linearized and the initial model
    on held-out sequences (float64, CPU) and appends the record to <run dir>/linearized.zarr.
    """
    from probes.linearized_model import linearize_checkpoint

    for run_dir in run_dirs:
        if not (run_dir / "config.json").is_file() or not (run_dir / "checkpoint.pt").is_file():
            raise AnalysisFailed(f"{run_dir}: not a run dir with a checkpoint (needs config.json and checkpoint.pt)")
        row = linearize_checkpoint(run_dir, batch_size=batch_size)
        click.echo(f"{run_dir}: step {row['step']}  loss init {row['linearized_init_loss']:.4f}  "
                   f"model {row['linearized_model_loss']:.4f}  linearized {row['linearized_loss']:.4f}  "
                   f"share {row['linearized_share']:.3f}  blocks' share {row['linearized_blocks_share']:.3f}")
