"""`diagnose roles` and `diagnose audit-model`: a model someone else built, read from a local dir.

Wiring only: loading (probes.local_files), roles (the adapter) and the audit (probes.audit_model).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import click


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    try:
        yield
    except (ValueError, LookupError, OSError) as err:
        raise click.ClickException(str(err).splitlines()[0] if str(err) else type(err).__name__) from None


@click.command("roles")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print parameter name → role as JSON.")
def roles(model_dir: Path, as_json: bool) -> None:
    """Show the Table 1 role inferred for every parameter of the Hugging Face model in MODEL_DIR.

    Reads config.json only (the model is built empty; nothing is downloaded).
    """
    with _one_line_errors():
        from probes.adapters import adapter_for
        from probes.audit_model import role_summary
        from probes.local_files import load_model

        model = load_model(model_dir, weights=False)
        found = adapter_for(model).parameter_roles()
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    for line in role_summary(model, found):
        click.echo(line)


@click.command("audit-model")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--optimizer", "optimizer_path", required=True, type=click.Path(path_type=Path),
              help="optimizer.state_dict() saved with torch.save; built from model.named_parameters().")
@click.option("--param", default="completep", show_default=True,
              help="sp | mup | alpha | depth-mup | completep.")
@click.option("--alpha", type=float, default=None, help="Depth exponent α in [0.5, 1] (with --param alpha).")
@click.option("--base-width", type=int, default=256, show_default=True, help="N_base.")
@click.option("--base-depth", type=int, default=2, show_default=True, help="L_base.")
@click.option("--lr", type=float, default=None, help="η_base (default: the embedding group's LR).")
@click.option("--wd", type=float, default=None, help="λ_base (default: the embedding group's weight decay).")
@click.option("--eps", type=float, default=None, help="ε_base (default: from the embedding group's ε, Eq. 40).")
@click.option("--sigma", type=float, default=None, help="σ_base (default: the embedding's std).")
@click.option("--init/--no-init", "check_init", default=True, show_default=True,
              help="Check the weights' init (only meaningful for a model saved before training).")
@click.option("--json", "as_json", is_flag=True, help="Print the mismatches as JSON.")
def audit_model(model_dir: Path, optimizer_path: Path, param: str, alpha: float | None, base_width: int,
                base_depth: int, lr: float | None, wd: float | None, eps: float | None, sigma: float | None,
                check_init: bool, as_json: bool) -> None:
    """Audit a saved model and optimizer against Table 1 (+ Eq. 40); exit 1 on any mismatch."""
    with _one_line_errors():
        from probes.audit_model import audit
        from probes.local_files import load_model, load_optimizer_groups

        model = load_model(model_dir)
        groups = load_optimizer_groups(optimizer_path, model)
        result = audit(model, groups, param, base_width, base_depth, alpha, lr_base=lr, wd_base=wd,
                       eps_base=eps, sigma_base=sigma, check_init=check_init)
    if as_json:
        click.echo(json.dumps({"ok": result.ok, "parameterization": result.parameterization.to_dict(),
                               "inferred": result.inferred, "rows": result.rows,
                               "mismatches": [m.__dict__ for m in result.mismatches]}, indent=2, default=str))
    else:
        for line in result.lines():
            click.echo(line)
    if not result.ok:
        sys.exit(1)
