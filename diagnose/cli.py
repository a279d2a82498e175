"""The `diagnose` command: train with probes, audit Table 1, sweep, report, compare, check.

This is the only package that wires trainer, probes and analyses together. Every bad input ends in
one line naming the value and what is allowed, and a non-zero exit, before anything is written.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from diagnose.commands_analysis import check, compare, report
from diagnose.commands_models import audit_model, roles
from diagnose.options import build_spec, probe_options, run_name, run_options
from diagnose.sweep import sweep


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Diagnose lazy versus complete feature learning in deep transformers (CompleteP, Dey et al. 2025).

    Start with `diagnose run --alpha 1`: it trains a small CompleteP GPT on the embedded Shakespeare
    corpus with probes on, and writes records, figures and a summary into a run dir.
    """


@main.command()
@run_options
@probe_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run dir (default: runs/<param>_w<width>_d<depth>_s<seed>_<time>).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint (from "
              "checkpoint.prev.pt, saying so, when checkpoint.pt cannot be read).")
@click.option("--report/--no-report", "make_report", default=True, help="Write figures and summary.md at the end.")
@click.option("--quiet", is_flag=True, help="Print only the run dir.")
@click.option("--dist-backend", type=click.Choice(["auto", "gloo", "nccl"]), default="auto", show_default=True,
              help="Under torchrun: the process-group backend (auto: nccl on CUDA, gloo on CPU).")
def run(out: Path | None, resume: bool, make_report: bool, quiet: bool, dist_backend: str, **opts) -> None:
    """Train one model with probes on and write its run dir.

    Data parallel: `torchrun --nproc-per-node N -m diagnose run ... --out DIR` (rank 0 writes).
    """
    from trainer.errors import ConfigError
    from trainer.loop import NonFiniteLoss, broadcast_from_main, distributed, env_rank_world, validate_train

    main_rank = env_rank_world()[0] == 0

    def fail(message: str):
        # One line from rank 0; the other ranks exit non-zero without repeating it.
        if main_rank:
            raise click.ClickException(message)
        raise click.exceptions.Exit(1)

    try:
        spec, probe_cfg = build_spec(opts)
        if not resume:  # before any process group, so a bad world size fails without a rendezvous
            validate_train(spec.train, env_rank_world()[1])
        with distributed(dist_backend, spec.train.device) as (rank, world):
            # Rank 0 names the run dir (the default holds a timestamp) and checks it; all ranks follow.
            decision = _decide_out(out, resume, spec) if rank == 0 else None
            out, error = broadcast_from_main(decision)
            if error:
                raise ConfigError(error)
            if resume:
                spec, probe_cfg = _stored_spec(out)
                validate_train(spec.train, world)
            result = execute_run(spec, probe_cfg, out, resume=resume, quiet=quiet)
    except ConfigError as err:
        fail(str(err))
    except NonFiniteLoss as err:
        fail(f"{err}; the last good checkpoint is kept in {out}")
    if not main_rank:
        return
    if make_report and not quiet:
        from analyses.report import write_report

        write_report([out], out / "report")
    click.echo(f"run dir: {out}" + (f"  (final val_loss {result['val_loss']:.4f})" if not quiet else ""))


def _decide_out(out: Path | None, resume: bool, spec) -> tuple[Path | None, str | None]:
    """(run dir, None), or (None, why it cannot be used)."""
    if out is None:
        if resume:
            return None, "--resume needs --out, the run dir to continue"
        out = Path("runs") / f"{run_name(spec)}_{time.strftime('%Y%m%d-%H%M%S')}"
    if resume and not (out / "config.json").is_file():
        return None, f"cannot resume: {out} is not a run dir (no config.json)"
    if not resume and (out / "config.json").exists():
        return None, f"run dir {out} already holds a run; pass --resume to continue it or another --out"
    return out, None


def _stored_spec(out: Path):
    """The spec a run was started with (resume ignores the options given now)."""
    from probes.recorder import ProbeConfig
    from trainer.loop import RunSpec

    stored = json.loads((out / "config.json").read_text())
    probe_cfg = None
    if stored.get("probes"):
        # Runs recorded before lin_batch_size existed measured the linearization on the whole probe batch.
        probe_cfg = ProbeConfig(**{"lin_batch_size": 0, **stored["probes"]})
    return RunSpec.from_dict(stored), probe_cfg


def execute_run(spec, probe_cfg, out: Path, resume: bool = False, quiet: bool = False) -> dict:
    """Train `spec` in `out` with probes (None: no probes). Shared by `run` and `sweep` workers."""
    import torch

    from probes.recorder import ProbeRecorder
    from trainer.loop import Trainer

    observers = []
    extra = {"probes": None}
    if probe_cfg is not None:
        recorder = ProbeRecorder(probe_cfg, out, spec)
        observers.append(recorder)
        extra["probes"] = probe_cfg.to_dict()
        from probes.linearized_model import LinearizedModelRecorder, lin_steps

        lin = lin_steps(spec.train.steps, probe_cfg.linearized)
        if lin:
            observers.append(LinearizedModelRecorder(out, lin, seed=probe_cfg.seed))
    trainer = Trainer(spec, out, observers=observers, extra_config=extra, quiet=quiet)
    trainer.extra_config["world_size"] = trainer.world  # config.json: how many processes trained it
    trainer.extra_config["torch_threads"] = torch.get_num_threads()  # ... and with how many CPU threads each
    return {**trainer.run(resume=resume), "timeline": trainer.timeline}


@main.command()
@click.option("--param", default="completep", show_default=True,
              help="sp, mup, alpha, depth-mup (α=0.5) or completep (α=1).")
@click.option("--alpha", type=float, default=None, help="Depth exponent α in [0.5, 1] (with --param alpha).")
@click.option("--width", type=int, default=256, show_default=True, help="Residual width N.")
@click.option("--depth", type=int, default=2, show_default=True, help="Number of blocks L.")
@click.option("--head-size", type=int, default=64, show_default=True, help="Attention head size d_head.")
@click.option("--base-width", type=int, default=256, show_default=True, help="N_base.")
@click.option("--base-depth", type=int, default=2, show_default=True, help="L_base.")
@click.option("--lr", type=float, default=2**-8, show_default=True, help="η_base.")
@click.option("--wd", type=float, default=0.1, show_default=True, help="λ_base.")
@click.option("--eps", type=float, default=1e-12, show_default=True, help="ε_base.")
@click.option("--sigma", type=float, default=0.02, show_default=True, help="σ_base.")
@click.option("--eps-scope", type=click.Choice(["eq40", "blocks-only", "all"]), default="eq40", show_default=True,
              help="Adam ε outside the blocks: ε_base/m_N (eq40: paper Eq. 40, authors' fixed code), "
                   "ε_base (blocks-only), or the block ε everywhere (all: authors' pre-fix code).")
@click.option("--mup-variant", type=click.Choice(["table", "reference-code"]), default="table", show_default=True,
              help="µP ε/WD per Table 1, or as the authors' µP-only code mode.")
@click.option("--attn-scale", type=click.Choice(["auto", "inv-d-head", "inv-sqrt-d-head"]), default="auto",
              show_default=True, help="Attention logit scale (auto: 1/√d_head for SP, 1/d_head otherwise).")
@click.option("--json", "as_json", is_flag=True, help="Print the audit as JSON.")
def audit(param: str, alpha: float | None, width: int, depth: int, head_size: int, base_width: int, base_depth: int,
          lr: float, wd: float, eps: float, sigma: float, eps_scope: str, mup_variant: str, attn_scale: str,
          as_json: bool) -> None:
    """Print Table 1 for a shape next to what the built model and optimizer have; exit 1 on a mismatch."""
    from diagnose.audit import audit as run_audit
    from diagnose.audit import format_audit
    from trainer.errors import ConfigError
    from trainer.parameterization import Parameterization, resolve_name

    try:
        name, a = resolve_name(param, alpha)
        p = Parameterization(name=name, alpha=a, width=width, depth=depth, base_width=base_width,
                             base_depth=base_depth, lr_base=lr, wd_base=wd, eps_base=eps, sigma_base=sigma,
                             eps_scope=eps_scope, mup_variant=mup_variant, d_head=head_size, attn_scale=attn_scale)
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
    result = run_audit(p)
    if as_json:
        rows = [dict(r, branch_multiplier=result["branch_multiplier"],
                     output_multiplier=result["output_multiplier"], attention_scale=result["attention_scale"])
                for r in result["rows"]]
        click.echo(json.dumps({"parameterization": p.to_dict(), "label": p.label, "ok": result["ok"],
                               "branch_multiplier": result["branch_multiplier"],
                               "output_multiplier": result["output_multiplier"],
                               "attention_scale": result["attention_scale"], "rows": rows}, indent=2))
    else:
        click.echo(format_audit(p, result))
    if not result["ok"]:
        sys.exit(1)


main.add_command(report)
main.add_command(compare)
main.add_command(check)

main.add_command(sweep)
main.add_command(roles)
main.add_command(audit_model)

from diagnose.conform import conform, linearize  # noqa: E402  (appended: conformance and the linearized model)

main.add_command(conform)
main.add_command(linearize)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--step", "spike_step", type=int, required=True, help="The spike's step (as metrics.jsonl marks it).")
@click.option("--after", type=int, default=3, show_default=True, help="Replay this many steps past --step.")
@click.option("--lead", type=int, default=8, show_default=True,
              help="Start at the nearest checkpoint at least this many steps before --step (the baseline).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Replay dir (default: RUN_DIR/replay_<step>).")
def replay(run_dir: Path, spike_step: int, after: int, lead: int, out: Path | None) -> None:
    """Replay a spike with probes at every step and write a spike report (which layers and signals moved first).

    Restores the nearest checkpoint before the spike (keep several with --keep-checkpoints-every),
    re-runs to --step + --after (bitwise the same training), and writes spike_report.md/.json/.png.
    """
    from analyses.health import write_spike_report
    from probes.replay import replay as run_replay
    from trainer.errors import ConfigError

    try:
        result = run_replay(run_dir, spike_step, after=after, lead=lead, out=out)
        report = write_spike_report(result["dir"], spike_step, replay=result)
    except (ConfigError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    first = (f"earliest excursion at step {report['onset_step']} in {', '.join(report['first_signals'])}, "
             f"layers {', '.join(map(str, report['first_layers']))}" if report["onset_step"] is not None
             else "no signal left its baseline")
    click.echo(f"replayed steps {result['start']}-{result['stop'] - 1} (bitwise: {result['bitwise']}); {first}")
    click.echo(f"spike report: {result['dir'] / 'spike_report.md'}")


if __name__ == "__main__":
    main()
