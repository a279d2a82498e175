"""Canonical names of the probe records: the one contract between probes (writer) and analyses (reader).

This module imports neither torch nor anything else from the toolkit, so `analyses` can read records
on a machine without torch. Every variable that the probes write is declared here with its dims,
units and meaning; the writer refuses a variable that is not declared, and the reader checks
`SCHEMA_VERSION` before it trusts a store.

Conventions
- `step` is the number of optimizer updates applied before the measurement: step 0 is the model at
  initialization. The linearization error at step t uses the update Δθ that takes θ_t to θ_{t+1}.
- RMS means sqrt(mean(x²)) over every element of the probe batch (batch × position × feature).
- Norms (`*_norm`) are Frobenius norms over the whole probe batch.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 1

# Stream and branch sites inside each block, in forward order. `*_out` is the raw branch output,
# `*_add` what is actually added to the residual stream (after the m_L^-α branch multiplier).
SITES: tuple[str, ...] = (
    "resid_pre",
    "attn_out",
    "attn_add",
    "resid_mid",
    "mlp_out",
    "mlp_add",
    "resid_post",
)
STREAM_SITES: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post")
BRANCHES: tuple[str, ...] = ("attn", "mlp")
# Parameter roles that live inside a block (per-layer records) and outside it (model-level records).
BLOCK_ROLES: tuple[str, ...] = ("block_norm", "hidden_weight", "hidden_bias")
GLOBAL_ROLES: tuple[str, ...] = ("embedding", "position_embedding", "final_norm", "unembedding")
ROLES: tuple[str, ...] = GLOBAL_ROLES[:2] + BLOCK_ROLES + GLOBAL_ROLES[2:]

# Model-level sites outside the blocks.
EMBED_SITE = "embed"  # token + position embedding output: the stream entering block 0
FINAL_SITE = "final_stream"  # input of the final LayerNorm: the last block's output


@dataclass(frozen=True)
class Variable:
    """One recorded quantity: its dims (after `step`), unit and meaning."""

    dims: tuple[str, ...]
    units: str
    description: str


VARIABLES: dict[str, Variable] = {
    # --- feature updates (per layer and site) -------------------------------------------------
    "act_rms": Variable(("layer", "site"), "activation", "RMS of the site activation h(t)"),
    "delta0_rms": Variable(("layer", "site"), "activation", "RMS of h(t) - h(0) on the probe batch"),
    "delta_prev_rms": Variable(
        ("layer", "site"), "activation", "RMS of h(t) - h(previous probe step) on the probe batch"
    ),
    # --- linearization error of each branch w.r.t. its own parameters (spec §3.5) -----------------
    "branch_norm": Variable(("layer", "branch"), "activation", "||F(h; θ_t)|| of the raw branch output"),
    "lin_norm": Variable(("layer", "branch"), "activation", "||J_θ F(h; θ_t) Δθ||, first-order change"),
    "nonlin_norm": Variable(
        ("layer", "branch"), "activation", "||F(h; θ_t+Δθ) - F(h; θ_t) - J_θ F Δθ||, the non-linear rest"
    ),
    "lin_ratio": Variable(("layer", "branch"), "1", "||nl|| / ||lin||: expect ∝ m_L^(α-1)"),
    "nonlin_to_output": Variable(("layer", "branch"), "1", "||nl|| / ||F||: expect ∝ m_L^(2(α-1))"),
    # --- residual-stream statistics --------------------------------------------------------------
    "branch_to_stream": Variable(
        ("layer", "branch"), "1", "RMS of what the branch adds / RMS of the stream it is added to"
    ),
    "stream_cosine": Variable(
        ("layer",), "1", "cosine (per token, averaged) between the stream entering and leaving the block"
    ),
    "final_update_share": Variable(
        ("layer",),
        "1",
        "<Δ(attn_add+mlp_add), Δh_final> / ||Δh_final||², Δ since step 0: the layer's share of the "
        "change of the final stream (shares of all layers plus the embedding sum to 1)",
    ),
    "grad_rms": Variable(("layer",), "gradient", "RMS of dLoss/d resid_pre on the probe batch"),
    # --- parameter updates -------------------------------------------------------------------------
    "update_rel": Variable(("layer", "block_role"), "1", "||ΔW|| / ||W|| over the role's tensors in the layer"),
    "update_rms": Variable(("layer", "block_role"), "parameter", "RMS of ΔW over the role's tensors"),
    "global_update_rel": Variable(("global_role",), "1", "||ΔW|| / ||W|| for parameters outside blocks"),
    "global_update_rms": Variable(("global_role",), "parameter", "RMS of ΔW for parameters outside blocks"),
    "effective_lr": Variable(("group",), "1", "learning rate of each optimizer group at this step"),
    # --- model-level stream ------------------------------------------------------------------------
    "final_rms": Variable((), "activation", "RMS of the final stream (input of the final LayerNorm)"),
    "final_abs_mean": Variable((), "activation", "mean |x| of the final stream (paper Fig. 7 quantity)"),
    "final_delta0_rms": Variable((), "activation", "RMS of h_final(t) - h_final(0)"),
    "embed_update_share": Variable((), "1", "the embedding's share of the change of the final stream"),
    # --- losses --------------------------------------------------------------------------------------
    "probe_loss": Variable((), "nats/token", "loss on the fixed probe batch at θ_t"),
    "train_loss": Variable((), "nats/token", "training loss of the step's batch"),
    "val_loss": Variable((), "nats/token", "held-out loss at the nearest validation (NaN if none yet)"),
    # --- weight-driven change of internal features since θ_0 (probes.feature_change) ---------------
    "feature_change": Variable(
        ("layer", "branch"), "1",
        "||φ(h; θ_t) - φ(h; θ_0)|| / ||φ(h; θ_0)|| on the branch's current input h; φ = MLP hidden activation "
        "(after the non-linearity) or attention's weighted values: expect ∝ m_L^(α-1)",
    ),
    "feature_cka": Variable(
        ("layer", "branch"), "1", "linear CKA between φ(h; θ_t) and φ(h; θ_0) over probe tokens: 1 - CKA ∝ m_L^(2(α-1))"
    ),
    "attn_pattern_change": Variable(
        ("layer",), "1", "||P(h; θ_t) - P(h; θ_0)|| / ||P(h; θ_0)|| of the attention pattern P on the current input h"
    ),
    # --- block-linearized model (probes.linearized_model; its own store, LINEARIZED_STORE_NAME) -----
    "linearized_loss": Variable(
        (), "nats/token", "held-out loss of the block-linearized model (every branch: F(θ_0) + J F(θ_0)(θ_t - θ_0))"
    ),
    "linearized_model_loss": Variable((), "nats/token", "held-out loss of the real model at θ_t (same batch)"),
    "linearized_init_loss": Variable((), "nats/token", "held-out loss of the model at θ_0 (same batch)"),
    "linearized_share": Variable(
        (), "1", "(init loss - linearized loss) / (init loss - model loss): the learning the lazy surrogate keeps"
    ),
    "linearized_block_loss": Variable(
        ("layer",), "nats/token", "held-out loss with only this block's branches linearized (all others real)"
    ),
    "linearized_frozen_loss": Variable(
        (), "nats/token", "held-out loss with every branch kept at θ_0 (F(h; θ_0)), the rest at θ_t"
    ),
    "linearized_blocks_share": Variable(
        (), "1", "(frozen loss - linearized loss) / (frozen loss - model loss): the blocks' learning kept"
    ),
}
# The block-linearized model's records live beside the probe store, on their own steps.
LINEARIZED_STORE_NAME = "linearized.zarr"
LINEARIZED_VARIABLES: tuple[str, ...] = ("linearized_loss", "linearized_model_loss", "linearized_init_loss",
                                         "linearized_share", "linearized_block_loss", "linearized_frozen_loss",
                                         "linearized_blocks_share")

# A float32 linearization error is recorded only where ‖nl‖ is at least this many times its measured
# round-off floor (probes/linearization.py); below it ‖nl‖ and both ratios are NaN, flagged.
LIN_FLOOR_MULTIPLE = 10.0
VARIABLES["nonlin_floor"] = Variable(
    ("layer", "branch"), "activation",
    "measured round-off floor of ||nl|| when the linearization runs in float32: sqrt(2) ||F32(h; θ_t) - "
    "F64(h; θ_t)||; NaN when it runs in float64 (floor ~5e8 times lower, not measured)",
)
VARIABLES["lin_below_floor"] = Variable(
    ("layer", "branch"), "1",
    f"1 where ||nl|| < {LIN_FLOOR_MULTIPLE:g} x nonlin_floor: nonlin_norm, lin_ratio and nonlin_to_output are "
    "NaN there (round-off, not a measurement); 0 elsewhere",
)

STORE_NAME = "probes.zarr"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
STATUS_NAME = "status.json"

# Attributes every store carries (the run's identity for sweeps). `config` is the resolved run config
# as a JSON string; the others are flattened copies for cheap sweep assembly.
SWEEP_ATTRS: tuple[str, ...] = ("param", "alpha", "width", "depth", "seed", "lr")


def coords_for(depth: int, groups: list[str]) -> dict[str, list]:
    """Coordinates of a store for a model of `depth` blocks and the given optimizer group names."""
    return {
        "layer": list(range(depth)),
        "site": list(SITES),
        "branch": list(BRANCHES),
        "block_role": list(BLOCK_ROLES),
        "global_role": list(GLOBAL_ROLES),
        "group": list(groups),
    }
