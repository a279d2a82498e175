"""Predicted scaling exponents, in one place: parameterization × quantity × axis (depth, width).

Every measured exponent that the toolkit checks (`diagnose conform`, the laziness verdicts, the docs)
reads its prediction here. Torch-free. An exponent e means "quantity ∝ m^e" along the axis, with
m = L/L_base (depth) or N/N_base (width), everything else fixed. `None` means the theory used here
makes no clean power-law prediction (the row is not checked).

Setup (Table 1: trainer/parameterization.py; spec §1, §3). Block l adds m_L^(−α)·F_l(LN(h_l)) to
the residual stream; in-block Adam LRs are η·m_N^(−1)·m_L^(α−1) (hidden weights) and η·m_L^(α−1)
(biases, norms); hidden weights start at std σ·m_N^(−1/2). SP and µP are the same with no depth
factor anywhere (branch multiplier 1, in-block LR independent of L); we write them as "α = 0 with no
depth LR factor", so a depth exponent below uses a = α (branch multiplier L^(−a)) and
r = α − 1 (in-block LR ∝ L^r) for the α family, and a = 0, r = 0 for SP and µP.

Derivations (depth axis; all leading order in L, width fixed):

1. `update_rms` (per role: hidden_weight, hidden_bias, block_norm). Adam's step is
   η_group·m̂/(√v̂+ε) and |m̂/√v̂| = Θ(1) per entry whatever the gradient's scale, as long as ε ≪ √v̂.
   So RMS(ΔW) ∝ η_group: depth exponent r; width exponent −1 for hidden weights under µP/α (LR
   η·m_N^(−1)), 0 for biases and norms, 0 for everything under SP. This is where a missing depth LR
   factor shows (exponent 0 instead of α − 1), and where an ε that is not scaled with the block
   gradients shows: block gradients scale as L^(−a), so with a fixed ε the step is
   η·g/(|g|+ε) and shrinks with depth once ε ≳ |g| (the Table 1 rule ε ∝ m_N^(−1) m_L^(−α) keeps
   ε/√v̂ fixed).
2. `update_rel` = ‖ΔW‖/‖W‖: RMS(W) of hidden weights and norm gains does not depend on depth, so
   the depth exponent is r as in 1. Width: hidden weights −1 − (−1/2) = −1/2 under µP/α (SP: 0);
   norms 0. Biases start at 0 (‖W‖ = 0 at init), so no prediction.
3. `lin_ratio` = ‖nl‖/‖lin‖ of one update (spec §3.2 D3, §3.5): the linear term is first order in
   Δθ ∝ L^r, the non-linear rest second order, their ratio ∝ L^r: α − 1 (0 for SP/µP: not lazy,
   but unstable, see 6). `nonlin_to_output` = ‖nl‖/‖F‖ is second order over Θ(1): 2r.
   Width: under µP every layer's update moves its features by Θ(1), so both are 0 in width.
4. `feature_change` δ = ‖φ(h;θ_t) − φ(h;θ_0)‖/‖φ(h;θ_0)‖ at a fixed input h: θ_t − θ_0 is a sum of
   t Adam steps, each ∝ L^r per entry, so to first order δ ∝ L^r: α − 1, like `lin_ratio`.
   `1 − feature_cka`: linear CKA is invariant to scaling and rotation of φ and maximal (1) at
   φ_t = φ_0, so its expansion in the perturbation has no first-order term: 1 − CKA = s·δ² + O(δ³),
   with s ∈ [0, 1] the share of the change that alters the token-similarity structure; with s
   independent of depth, 1 − CKA ∝ δ² ∝ L^(2r). This is an expansion in δ and holds while δ ≪ 1,
   so the row is fitted only on the probe steps at which every run's δ is below DELTA_MAX
   (`Quantity.max_feature_change`). Beyond it (δ ≈ 1 after a few dozen steps at the default LR),
   1 − CKA measures the geometry of the learned features, not their size, and its depth exponent at
   α = 1 was measured anywhere from −1.1 to +0.1 on correct CompleteP sweeps depending on the init
   scale σ_base alone (docs/EXPERIMENTS.md §4): no parameterization predicts it there.
   Width: µP keeps δ = Θ(1), so 0 for δ; for 1 − CKA no prediction is checked (see `_width`).
5. `act_rms` of `attn_add`/`mlp_add` at step 0 (what each block adds to the stream at init): the
   raw branch output F(LN(h)) does not depend on depth at init (LN normalizes its input), and the
   block multiplies it by m_L^(−a): exponent −α (0 for SP/µP). The cleanest check of the branch
   multiplier. Width: 0 under µP/α (SP: None).
   `final_rms` at step 0 (stream size at init, spec D1): L branch outputs of Θ(1), roughly
   independent at init, each scaled by L^(−a), add a variance L·L^(−2a): RMS ∝ L^((1−2a)/2): −1/2 at
   α = 1, 0 at α = 1/2, +1/2 for SP/µP. This holds once the branches outweigh the embedding, whose
   contribution does not grow with depth; at small depths and small init the embedding dominates and
   the measured exponent lies between 0 (its floor) and the prediction. Width: Θ(1) in width under
   µP/α (0); SP: no clean power law (None).
6. `final_delta0_rms` (stream change since init, at the last probe step: "stream size after
   training", spec D2): each block moves the stream by L^(−a)·L^r, and the L blocks' updates add
   coherently (they follow the same loss gradient): L^(1−a+r): 0 for every α (the desideratum), but
   +1 for SP/µP: the stream change grows linearly with depth (paper Fig. 7, spec §4.2). Width: 0
   under µP/α.
7. `grad_rms` = RMS of dLoss/d h_l at step 0 (gradient w.r.t. the stream): the final LayerNorm
   divides by the stream's RMS, and the residual path passes gradients on at Θ(1), so the depth
   exponent is minus that of 5: α − 1/2 (−1/2 for SP/µP). Width: the readout multiplies by m_N^(−1)
   under µP/α, and each stream coordinate's gradient is a sum over the vocabulary of Θ(1) terms:
   −1 under µP/α (µP's Θ(1/N) activation gradients); SP: None.
8. `1 − linearized_share` (probes.linearized_model): the block-linearized surrogate misses each
   block's second-order term, L^(−a)·L^(2r) in the stream, L of them coherently: L^(1−a+2r), over a
   total stream change L^(1−a+r): relative loss of learning ∝ L^r: α − 1; so the share tends to 1 as
   depth grows when α < 1 and stays bounded away from 1 at α = 1. That is the *coherent* limit. If
   the blocks' second-order errors add incoherently (√L instead of L) and are orthogonal to the loss
   gradient (so the loss sees their square), the exponent is 2(r − 1/2) = 2α − 3: the *incoherent*
   limit, the floor of this row (`floor_exponent`). The depth sweep of docs/EXPERIMENTS.md measures
   values between the two for every α (CompleteP's share also approaches 1 at 40 steps; at 200
   steps the local slope from depth 8 to 16 is −0.25 at α = 1 and −0.67 at α = ½, near the coherent limit).
   SP/µP: the surrogate error grows with depth like the stream change itself: None.

What SP and µP imply: with no depth dependence of the per-block LR (r = 0) and no branch
multiplier (a = 0), per-entry updates, `lin_ratio`, `feature_change` and CKA do not change with
depth (not lazy), but the stream size at init grows as √L and its change under training as L: the
model is unstable in depth rather than lazy (spec D1, D2), and hyperparameters do not transfer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

AXES: tuple[str, ...] = ("depth", "width")


@dataclass(frozen=True)
class Quantity:
    """A measured quantity as `analyses.conformance` reduces it from the records.

    `variable`: the store variable; `selector`: its non-layer dim ("branch", "block_role" or None);
    `steps`: which probe steps are averaged ("init": step 0; "last": the last probe step;
    "train": every probe step ≥ 1); `transform`: "1-x" for 1 − CKA and 1 − share, else "";
    `order`: 1 for first-order quantities, 2 for second order (wider tolerance, see conformance);
    `components`: the values of the selector dim that are checked (None: all);
    `floor`: the exponent is asymptotic, approached from `floor` at small sizes (a part that does not
    scale, such as the embedding's share of the stream, dominates there): a measured exponent between
    `floor` and the prediction is not a failure (conformance reports it as inconclusive);
    `max_feature_change`: the prediction is the leading term of an expansion in the feature change δ,
    so only the probe steps at which every run of a fit has δ (of the same branch, geometric mean
    over layers) below this value are used.
    """

    name: str
    variable: str
    selector: str | None
    steps: str
    transform: str = ""
    order: int = 1
    components: tuple[str, ...] | None = None
    floor: float | None = None
    max_feature_change: float | None = None


# Where the second-order expansion of 1 − CKA in δ is used: its relative truncation error is O(δ),
# so below 0.3 an error of ≤ 30% in 1 − CKA moves a slope over depths 2–16 by ≤ log(1.3)/log(8) ≈ 0.13.
DELTA_MAX = 0.3


QUANTITIES: dict[str, Quantity] = {q.name: q for q in (
    Quantity("lin_ratio", "lin_ratio", "branch", "train"),
    Quantity("nonlin_to_output", "nonlin_to_output", "branch", "train", order=2),
    Quantity("feature_change", "feature_change", "branch", "train"),
    Quantity("1-feature_cka", "feature_cka", "branch", "train", transform="1-x", order=2,
             max_feature_change=DELTA_MAX),
    Quantity("update_rms", "update_rms", "block_role", "train"),
    Quantity("update_rel", "update_rel", "block_role", "train"),
    Quantity("branch_add_init", "act_rms", "site", "init", components=("attn_add", "mlp_add")),
    Quantity("stream_init", "final_rms", None, "init", floor=0.0),
    Quantity("stream_change", "final_delta0_rms", None, "last"),
    Quantity("grad_stream", "grad_rms", None, "init", floor=0.0),
    Quantity("1-linearized_share", "linearized_share", None, "last", transform="1-x"),
)}


def _family(param: str, alpha: float) -> tuple[float, float]:
    """(a, r): branch multiplier L^(−a) and in-block LR ∝ L^r (see the module docstring)."""
    if param in ("sp", "mup"):
        return 0.0, 0.0
    if param == "alpha" and 0.5 <= alpha <= 1.0:
        return alpha, alpha - 1.0
    raise ValueError(f"no theory for param={param!r}, alpha={alpha!r} (sp, mup, or alpha in [0.5, 1])")


# Depth exponents as functions of (a, r, width-scaled?, component); width exponents below.
_DEPTH: dict[str, Callable[[float, float, str | None], float | None]] = {
    "lin_ratio": lambda a, r, c: r,
    "nonlin_to_output": lambda a, r, c: 2 * r,
    "feature_change": lambda a, r, c: r,
    "1-feature_cka": lambda a, r, c: 2 * r,
    "update_rms": lambda a, r, c: r,
    "update_rel": lambda a, r, c: None if c == "hidden_bias" else r,
    "branch_add_init": lambda a, r, c: -a,
    "stream_init": lambda a, r, c: (1 - 2 * a) / 2,
    "stream_change": lambda a, r, c: 1 - a + r,
    "grad_stream": lambda a, r, c: -(1 - 2 * a) / 2,
    "1-linearized_share": lambda a, r, c: r if a > 0 else None,
}


def _width(quantity: str, param: str, component: str | None) -> float | None:
    if param == "sp":  # SP is unstable in width; only the per-entry update size is clean
        if quantity == "update_rms":
            return 0.0
        if quantity == "update_rel":
            return None if component == "hidden_bias" else 0.0
        return None
    if quantity == "update_rms":
        return -1.0 if component == "hidden_weight" else 0.0
    if quantity == "update_rel":
        return {"hidden_weight": -0.5, "block_norm": 0.0}.get(component or "")
    if quantity == "grad_stream":
        return -1.0
    if quantity in ("1-linearized_share", "1-feature_cka"):
        # 1 − CKA: at the widths a CPU reaches, the part of φ_t − φ_0 that is unaligned with φ_0 changes
        # the token Gram matrix by ∝ 1/N, and it dominates after a few steps (measured −0.88 for µP at
        # N = 32–128, docs/EXPERIMENTS.md); the width-independent feature-learning part is not isolated.
        return None
    return 0.0


def predicted_exponent(param: str, alpha: float, quantity: str, axis: str,
                       component: str | None = None) -> float | None:
    """The predicted log-log exponent of `quantity` along `axis` ("depth" or "width").

    `param`: "sp", "mup" or "alpha" (with `alpha` in [0.5, 1]; ignored otherwise); `component`: the
    branch ("attn", "mlp") or block role ("hidden_weight", ...) for per-branch/role quantities.
    None: no prediction (the row is not checked). Raises KeyError for an unknown quantity or axis.
    """
    if quantity not in QUANTITIES:
        raise KeyError(f"unknown quantity {quantity!r}; known: {', '.join(QUANTITIES)}")
    if axis not in AXES:
        raise KeyError(f"unknown axis {axis!r}; known: {', '.join(AXES)}")
    a, r = _family(param, 0.0 if param != "alpha" else alpha)
    if axis == "width":
        return _width(quantity, param, component)
    value = _DEPTH[quantity](a, r, component)
    return None if value is None else float(value) + 0.0  # + 0.0: no negative zero in tables


def prediction_table(params: list[tuple[str, float]] | None = None) -> list[dict]:
    """Every prediction as rows {param, alpha, quantity, component, axis, predicted} (for docs/tests)."""
    params = params or [("sp", math.nan), ("mup", math.nan), ("alpha", 0.5), ("alpha", 0.75), ("alpha", 1.0)]
    components = {"branch": ("attn", "mlp"), "block_role": ("block_norm", "hidden_weight", "hidden_bias"),
                  None: (None,)}
    rows = []
    for param, alpha in params:
        for q in QUANTITIES.values():
            for comp in q.components or components[q.selector]:
                for axis in AXES:
                    rows.append({"param": param, "alpha": alpha, "quantity": q.name, "component": comp,
                                 "axis": axis, "predicted": predicted_exponent(param, alpha, q.name, axis, comp)})
    return rows


def prediction_markdown() -> str:
    """The table of predictions as markdown: one row per quantity (and component), one column per
    parameterization and axis ("–": not predicted). `python -m analyses.theory` prints it."""
    params = [("sp", math.nan, "SP"), ("mup", math.nan, "µP"), ("alpha", 0.5, "α=0.5"), ("alpha", 0.75, "α=0.75"),
              ("alpha", 1.0, "α=1")]
    head = ["quantity", *[f"{label} {axis}" for _, _, label in params for axis in AXES]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    components = {"branch": ("attn", "mlp"), "block_role": ("block_norm", "hidden_weight", "hidden_bias"),
                  None: (None,)}
    for q in QUANTITIES.values():
        for comp in q.components or components[q.selector]:
            cells = []
            for param, alpha, _ in params:
                for axis in AXES:
                    e = predicted_exponent(param, alpha, q.name, axis, comp)
                    cells.append("–" if e is None else f"{e:+g}")
            name = q.name if comp is None else f"{q.name}[{comp}]"
            lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(prediction_markdown())


def floor_exponent(param: str, alpha: float, quantity: str, axis: str) -> float | None:
    """The other end of an exponent's range where the prediction is an asymptotic or coherent limit
    (theory.Quantity.floor; for `1-linearized_share` the incoherent limit 2α − 3), else None."""
    q = QUANTITIES[quantity]
    if quantity == "1-linearized_share" and axis == "depth" and param == "alpha":
        return 2 * (alpha - 1.0) - 1.0
    return q.floor
