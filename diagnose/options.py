"""CLI options that map one to one onto the config dataclasses, shared by `run` and `sweep`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

# Defaults sized so that `diagnose run --alpha 1` finishes in a few minutes on a 2-core CPU.
DEFAULT_WIDTH, DEFAULT_DEPTH, DEFAULT_STEPS = 128, 4, 400


def _stack(options: list[Callable]) -> Callable:
    def decorator(f: Callable) -> Callable:
        for option in reversed(options):
            f = option(f)
        return f

    return decorator


def _run_option_list(lists: bool) -> list[Callable]:
    """Options of `run`; with `lists`, the sweep axes take comma-separated lists (as strings)."""
    axis = (lambda kind: str) if lists else (lambda kind: kind)  # noqa: E731
    return [
        click.option("--param", default="alpha", show_default=True,
                     help="Parameterization: sp, mup, alpha, depth-mup (α=0.5) or completep (α=1)."),
        click.option("--alpha", type=axis(float), default=None, help="Depth exponent α in [0.5, 1] (default 1)."),
        click.option("--width", type=axis(int), default=DEFAULT_WIDTH, show_default=True,
                     help="Residual width N (a multiple of --head-size)."),
        click.option("--depth", type=axis(int), default=DEFAULT_DEPTH, show_default=True, help="Number of blocks L."),
        click.option("--head-size", type=int, default=64, show_default=True, help="Attention head size d_head."),
        click.option("--base-width", type=int, default=256, show_default=True, help="Base width N_base."),
        click.option("--base-depth", type=int, default=2, show_default=True, help="Base depth L_base."),
        click.option("--lr", type=axis(float), default=2**-10, show_default=True,
                     help="Base learning rate η_base (2^-10 was best of 2^-8, 2^-10 for the default shape)."),
        click.option("--wd", type=float, default=0.0, show_default=True, help="Base AdamW weight decay λ_base."),
        click.option("--eps", type=float, default=1e-12, show_default=True, help="Base Adam ε_base."),
        click.option("--sigma", type=float, default=0.02, show_default=True, help="Base init std σ_base."),
        click.option("--eps-scope", type=click.Choice(["eq40", "blocks-only", "all"]), default="eq40",
                     show_default=True,
                     help="Adam ε outside the blocks: ε_base/m_N (eq40: paper Eq. 40, authors' fixed code), "
                          "ε_base (blocks-only), or the block ε everywhere (all: authors' pre-fix code)."),
        click.option("--mup-variant", type=click.Choice(["table", "reference-code"]), default="table",
                     show_default=True, help="µP ε/WD per Table 1, or as the authors' µP-only code mode."),
        click.option("--attn-scale", type=click.Choice(["auto", "inv-d-head", "inv-sqrt-d-head"]), default="auto",
                     show_default=True, help="Attention logit scale (auto: 1/√d_head for SP, 1/d_head otherwise)."),
        click.option("--tie-embeddings", is_flag=True, help="Tie the unembedding to the token embedding."),
        click.option("--steps", type=int, default=DEFAULT_STEPS, show_default=True, help="Optimizer updates."),
        click.option("--batch-size", type=int, default=16, show_default=True, help="Sequences per update (global)."),
        click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per update."),
        click.option("--seq-len", type=int, default=128, show_default=True, help="Context length in bytes."),
        click.option("--warmup-frac", type=float, default=0.1, show_default=True, help="Share of warmup steps."),
        click.option("--schedule", type=click.Choice(["linear", "cosine", "constant"]), default="linear",
                     show_default=True, help="LR decay after warmup."),
        click.option("--grad-clip", type=float, default=0.0, show_default=True,
                     help="Max global grad norm (0: off). Off by default: at small widths the norm starts near 8, so "
                          "clipping rescales every step by a depth-dependent factor and biases the laziness slopes "
                          "(docs/ESTIMATOR.md)."),
        click.option("--eval-every", type=int, default=100, show_default=True, help="Steps between val losses."),
        click.option("--eval-batches", type=int, default=4, show_default=True,
                     help="Held-out batches per validation loss."),
        click.option("--eval-batch-size", type=int, default=16, show_default=True,
                     help="Sequences per validation batch."),
        click.option("--checkpoint-every", type=int, default=100, show_default=True,
                     help="Steps between checkpoints."),
        click.option("--log-every", type=int, default=10, show_default=True,
                     help="Steps between metric flushes (the only host syncs of the loss)."),
        click.option("--seed", type=axis(int), default=0, show_default=True, help="Init and data-order seed."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
                     help="auto: bf16 autocast on CUDA, float32 on CPU."),
        click.option("--compile/--no-compile", "compile_", default=False, show_default=True,
                     help="torch.compile the training forward."),
        click.option("--data", default="shakespeare", show_default=True,
                     help="'shakespeare' (embedded), a text file, or a token file with --token-dtype."),
        click.option("--token-dtype", type=click.Choice(["", "uint16", "uint32"]), default="",
                     help="Token file dtype."),
        click.option("--vocab-size", type=int, default=256, show_default=True, help="Vocabulary (256 for bytes)."),
        click.option("--ablate", default="", show_default=False,
                     help="DEBUG: break Table 1 on purpose (comma-separated: no-depth-lr, no-branch-multiplier, "
                          "global-eps, sp-init), to see `diagnose conform` catch it."),
        click.option("--dist", type=click.Choice(["ddp", "fsdp"]), default="ddp", show_default=True,
                     help="Several processes (torchrun, Slurm): ddp keeps the whole model on each; fsdp (FSDP2) "
                          "shards parameters, gradients and optimizer state (docs/SCALE_OUT.md)."),
        click.option("--keep-checkpoints-every", type=int, default=0, show_default=True,
                     help="Also keep every K-th step's checkpoint (for `diagnose replay`; 0: only the latest)."),
        click.option("--debug-lr-spike", default="", metavar="STEP:FACTOR",
                     help="Debug/test hook: multiply the LR of update STEP by FACTOR (a loss spike on purpose)."),
    ]


run_options = _stack(_run_option_list(lists=False))
sweep_axis_options = _stack(_run_option_list(lists=True))

probe_options = _stack([
    click.option("--probes/--no-probes", default=True, show_default=True, help="Record probes."),
    click.option("--probe-every", type=int, default=25, show_default=True,
                 help="Probe every K steps (plus step 0 and a log-spaced early schedule)."),
    click.option("--probe-early/--no-probe-early", default=True, show_default=True,
                 help="Also probe on the log-spaced early schedule 1, 2, 4, ... below --probe-every."),
    click.option("--probe-batch", type=int, default=8, show_default=True, help="Sequences in the probe batch."),
    click.option("--probe-dtype", type=click.Choice(["auto", "float64", "float32"]), default="float64",
                 show_default=True,
                 help="Linearization precision, float64 on every device (auto: the same). float32: values "
                      "under 10x their measured round-off floor are NaN, flagged in lin_below_floor (in the "
                      "measured runs: every value at LR factors <= 0.01). Cost of float64: on a GPU not "
                      "measured (no GPU lent); on a CPU 1.10x float32 (benchmarks/RESULTS.md)."),
    click.option("--probe-lin-batch", type=int, default=1, show_default=True,
                 help="Sequences of the probe batch used for the linearization error (0: all)."),
    click.option("--probe-flush", type=int, default=64, show_default=True,
                 help="Probe steps buffered before each append to the store."),
    click.option("--probe-flush-seconds", type=float, default=60.0, show_default=True,
                 help="Append sooner once this many seconds have passed since the last append."),
    click.option("--probe-live", default="", help="Live dashboards while the run goes: tensorboard, wandb, or "
                 "both comma-separated (off by default; the store stays the record)."),
    click.option("--probe-linearized", type=click.IntRange(min=0), default=4, show_default=True,
                 help="Log-spaced steps (ending at the last) at which the block-linearized model's loss is "
                      "measured (0: off)."),
    click.option("--probe-feature-batch", type=click.IntRange(min=0), default=2, show_default=True,
                 help="Sequences of the probe batch used for the feature change since init (0: all)."),
    click.option("--probe-health/--no-probe-health", default=True, show_default=True,
                 help="Also record the training-health statistics (attention, outliers, Adam state, spectra)."),
    click.option("--probe-health-every", type=int, default=100, show_default=True,
                 help="Training-health statistics at probe steps that are multiples of this (cost; NaN between)."),
])


def build_spec(opts: dict[str, Any]):
    """(RunSpec, ProbeConfig | None) from the CLI options; raises ConfigError on bad values."""
    from probes.recorder import ProbeConfig
    from trainer.data import DataConfig
    from trainer.errors import ConfigError
    from trainer.loop import RunSpec, TrainConfig, validate_train
    from trainer.model import ModelConfig
    from trainer.parameterization import Parameterization, resolve_name

    name, alpha = resolve_name(opts["param"], opts["alpha"])
    if name != "alpha" and opts["alpha"] is not None:
        raise ConfigError(f"--alpha {opts['alpha']:g} only applies to --param alpha, not {opts['param']!r}")
    for key in ("seq_len", "vocab_size"):
        if opts[key] <= 0:
            raise ConfigError(f"--{key.replace('_', '-')}={opts[key]} must be a positive integer")
    param = Parameterization(
        name=name, alpha=alpha, width=opts["width"], depth=opts["depth"], base_width=opts["base_width"],
        base_depth=opts["base_depth"], sigma_base=opts["sigma"], lr_base=opts["lr"], wd_base=opts["wd"],
        eps_base=opts["eps"], d_head=opts["head_size"], eps_scope=opts["eps_scope"],
        mup_variant=opts["mup_variant"], attn_scale=opts["attn_scale"], ablate=opts.get("ablate", ""),
    )
    model = ModelConfig(seq_len=opts["seq_len"], vocab_size=opts["vocab_size"], tie_embeddings=opts["tie_embeddings"])
    data = DataConfig(source=opts["data"], token_dtype=opts["token_dtype"], vocab_size=opts["vocab_size"])
    train = TrainConfig(
        steps=opts["steps"], batch_size=opts["batch_size"], grad_accum=opts["grad_accum"],
        warmup_frac=opts["warmup_frac"], schedule=opts["schedule"], grad_clip=opts["grad_clip"],
        eval_every=opts["eval_every"], eval_batches=opts["eval_batches"],
        eval_batch_size=opts["eval_batch_size"],
        checkpoint_every=opts["checkpoint_every"], log_every=opts["log_every"],
        seed=opts["seed"], device=opts["device"], dtype=opts["dtype"], compile=opts["compile_"],
        dist=opts["dist"],
        keep_checkpoints_every=opts.get("keep_checkpoints_every", 0),
        **_lr_spike(opts.get("debug_lr_spike", "")),
    )
    validate_train(train)
    probes = None
    if opts["probes"]:
        probes = ProbeConfig(every=opts["probe_every"], early=opts["probe_early"], batch_size=opts["probe_batch"],
                             dtype=opts["probe_dtype"], lin_batch_size=opts["probe_lin_batch"],
                             flush_every=opts["probe_flush"], flush_seconds=opts["probe_flush_seconds"],
                             live=opts.get("probe_live", ""),
                             linearized=opts.get("probe_linearized", 4),
                             feature_batch_size=opts.get("probe_feature_batch", 2),
                             health=opts.get("probe_health", True),
                             health_every=opts.get("probe_health_every", 100))
    return RunSpec(param=param, model=model, data=data, train=train), probes


def _lr_spike(text: str) -> dict[str, Any]:
    """--debug-lr-spike STEP:FACTOR → the TrainConfig fields."""
    from trainer.errors import ConfigError

    if not text:
        return {}
    try:
        step, factor = text.split(":")
        return {"debug_lr_spike_step": int(step), "debug_lr_spike_factor": float(factor)}
    except ValueError:
        raise ConfigError(f"--debug-lr-spike {text!r} must be STEP:FACTOR, e.g. 40:30") from None


def run_name(spec) -> str:
    p = spec.param
    return f"{p.label}_w{p.width}_d{p.depth}_lr{p.lr_base:.3g}_s{spec.train.seed}"
