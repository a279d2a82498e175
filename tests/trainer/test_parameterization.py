"""Parameterization.rule against the spec's Table 1 (completep-spec.md §1), re-derived here by hand.

The expected values are written from the spec's formulas, column by column, not from the code's
branches: if the code and this file disagree, one of them misreads the table.
"""

from __future__ import annotations

import math
from itertools import product

import pytest

from trainer.errors import ConfigError
from trainer.parameterization import Parameterization, Role, resolve_name

# Base HPs deliberately not powers of two, so a swapped or missing factor cannot cancel by accident.
SIGMA, ETA, LAM, EPS = 0.021, 3e-3, 0.07, 1e-9
BASE_WIDTH, BASE_DEPTH, D_HEAD = 256, 2, 64
M_N = (0.25, 1.0, 4.0)
M_L = (0.5, 1.0, 8.0, 32.0)
ALPHAS = (0.5, 0.75, 1.0)
GRID = list(product(M_N, M_L, ALPHAS))


def make(name: str, m_n: float, m_l: float, alpha: float, **kw) -> Parameterization:
    return Parameterization(name=name, alpha=alpha, width=int(BASE_WIDTH * m_n), depth=int(BASE_DEPTH * m_l),
                            base_width=BASE_WIDTH, base_depth=BASE_DEPTH, sigma_base=SIGMA, lr_base=ETA,
                            wd_base=LAM, eps_base=EPS, d_head=D_HEAD, **kw)


def table1(name: str, m_n: float, m_l: float, a: float) -> dict[Role, tuple[str, float, float, float, float]]:
    """Role -> (init, init std, LR, weight decay, Adam ε), straight from Table 1 and its notes (§1).

    Not in the table, taken from the spec's notes: LN gains 1 / biases 0 (std reported as 0), WD 0 for
    norms and biases, embeddings/unembedding WD λ, and outside the residual blocks Adam ε_base·m_N^(−1)
    (the paper's Eq. 40; ε_base for SP, which scales no ε).
    """
    if name == "sp":
        hidden_std, hidden_lr, bias_lr, ln_lr = SIGMA, ETA, ETA, ETA
        hidden_wd, block_eps, other_eps = LAM, EPS, EPS
    elif name == "mup":
        hidden_std = math.sqrt(SIGMA**2 * m_n**-1)  # variance σ²·m_N^(−1)
        hidden_lr, bias_lr, ln_lr = ETA * m_n**-1, ETA, ETA
        hidden_wd, block_eps, other_eps = LAM * m_n, EPS * m_n**-1, EPS * m_n**-1
    else:  # α-parameterization
        hidden_std = math.sqrt(SIGMA**2 * m_n**-1)
        hidden_lr = ETA * m_n**-1 * m_l ** (a - 1)
        bias_lr = ln_lr = ETA * m_l ** (a - 1)
        hidden_wd, block_eps, other_eps = LAM * m_n, EPS * m_n**-1 * m_l**-a, EPS * m_n**-1
    return {
        Role.EMBEDDING: ("normal", SIGMA, ETA, LAM, other_eps),
        Role.POSITION_EMBEDDING: ("normal", SIGMA, ETA, LAM, other_eps),
        Role.BLOCK_NORM: ("ones", 0.0, ln_lr, 0.0, block_eps),
        Role.HIDDEN_WEIGHT: ("normal", hidden_std, hidden_lr, hidden_wd, block_eps),
        Role.HIDDEN_BIAS: ("zeros", 0.0, bias_lr, 0.0, block_eps),
        Role.FINAL_NORM: ("ones", 0.0, ETA, 0.0, other_eps),
        Role.UNEMBEDDING: ("normal", SIGMA, ETA, LAM, other_eps),
    }


def assert_rule(p: Parameterization, role: Role, expected: tuple[str, float, float, float, float]) -> None:
    init, std, lr, wd, eps = expected
    r = p.rule(role)
    where = f"{p.label} m_N={p.m_n} m_L={p.m_l} {role.value}"
    assert r.role is role
    assert r.init == init, where
    assert math.isclose(r.init_std, std, rel_tol=1e-12), f"{where}: init_std {r.init_std} != {std}"
    assert math.isclose(r.lr, lr, rel_tol=1e-12), f"{where}: lr {r.lr} != {lr}"
    assert math.isclose(r.lr_mult, lr / ETA, rel_tol=1e-12), f"{where}: lr_mult {r.lr_mult}"
    assert math.isclose(r.weight_decay, wd, rel_tol=1e-12), f"{where}: wd {r.weight_decay} != {wd}"
    assert math.isclose(r.eps, eps, rel_tol=1e-12), f"{where}: eps {r.eps} != {eps}"


@pytest.mark.parametrize("name", ["sp", "mup", "alpha"])
def test_every_role_matches_table1_on_the_grid(name):
    for m_n, m_l, a in GRID:
        p = make(name, m_n, m_l, a)
        assert p.m_n == m_n and p.m_l == m_l
        expected = table1(name, m_n, m_l, a)
        assert [r.role for r in p.table()] == list(Role)  # table() lists every role once, in order
        for role in Role:
            assert_rule(p, role, expected[role])


@pytest.mark.parametrize("name", ["sp", "mup", "alpha"])
def test_forward_multipliers_match_table1(name):
    for m_n, m_l, a in GRID:
        p = make(name, m_n, m_l, a)
        # MHA/MLP residual: X + m_L^(−α)·F(LN X) for α; plain X + F for SP and µP.
        branch = m_l**-a if name == "alpha" else 1.0
        # Unembedding forward: X W^T · m_N^(−1) for µP and α; plain for SP.
        output = 1.0 if name == "sp" else 1.0 / m_n
        # Attention logits (reference code, §1 "rows missing"): 1/d_head for µP and α, 1/√d_head for SP.
        attn = 1.0 / math.sqrt(D_HEAD) if name == "sp" else 1.0 / D_HEAD
        assert math.isclose(p.branch_multiplier, branch, rel_tol=1e-12), (name, m_n, m_l, a)
        assert math.isclose(p.output_multiplier, output, rel_tol=1e-12), (name, m_n, m_l, a)
        assert math.isclose(p.attention_scale, attn, rel_tol=1e-12), (name, m_n, m_l, a)


def test_completep_is_mup_plus_branch_and_eps_depth_factors():
    # §1: at α = 1 the depth LR factor is 1, so CompleteP differs from µP only by the 1/m_L branch
    # multiplier and the m_L^(−1) factor on the block ε.
    for m_n, m_l in product(M_N, M_L):
        mup, cp = make("mup", m_n, m_l, 1.0), make("alpha", m_n, m_l, 1.0)
        for role in Role:
            a, b = mup.rule(role), cp.rule(role)
            assert (a.init, a.init_std, a.weight_decay) == (b.init, b.init_std, b.weight_decay)
            assert math.isclose(a.lr, b.lr, rel_tol=1e-12)
            factor = 1.0 / m_l if role.in_block else 1.0
            assert math.isclose(b.eps, a.eps * factor, rel_tol=1e-12)
        assert math.isclose(cp.branch_multiplier, 1.0 / m_l, rel_tol=1e-12)


def test_alpha_is_ignored_by_sp_and_mup():
    for name in ("sp", "mup"):
        for m_n, m_l in product(M_N, M_L):
            ref = make(name, m_n, m_l, 1.0)
            other = make(name, m_n, m_l, 0.5)
            assert ref.table() == other.table()
            assert other.branch_multiplier == 1.0


def test_weight_decay_shrink_of_hidden_weights_is_width_independent():
    # §1: PyTorch AdamW shrinks by η·λ per step; for hidden weights η_base·m_N^(−1)·λ_base·m_N does not
    # depend on width (µP and α), and at α = 1 not on depth either.
    for name in ("mup", "alpha"):
        shrink = {(m_n, m_l): make(name, m_n, m_l, 1.0).rule(Role.HIDDEN_WEIGHT) for m_n, m_l in product(M_N, M_L)}
        for r in shrink.values():
            assert math.isclose(r.lr * r.weight_decay, ETA * LAM, rel_tol=1e-12)


@pytest.mark.parametrize("name", ["sp", "mup", "alpha"])
def test_eps_scope_all_applies_block_eps_everywhere(name):
    # Authors' code (§1 note 3): one scaled ε for every group, embeddings and final LN included.
    for m_n, m_l, a in GRID:
        table = make(name, m_n, m_l, a)
        everywhere = make(name, m_n, m_l, a, eps_scope="all")
        block_eps = table1(name, m_n, m_l, a)[Role.HIDDEN_WEIGHT][4]
        for role in Role:
            assert math.isclose(everywhere.rule(role).eps, block_eps, rel_tol=1e-12), (name, role)
            t, e = table.rule(role), everywhere.rule(role)
            assert (t.init, t.init_std, t.lr, t.weight_decay) == (e.init, e.init_std, e.lr, e.weight_decay)
        # The non-block roles really change whenever the block ε carries a depth factor.
        if not math.isclose(block_eps, table1(name, m_n, m_l, a)[Role.EMBEDDING][4], rel_tol=1e-12):
            assert everywhere.rule(Role.EMBEDDING).eps != table.rule(Role.EMBEDDING).eps


@pytest.mark.parametrize("name", ["sp", "mup", "alpha"])
def test_eps_scope_blocks_only_keeps_eps_base_outside_the_blocks(name):
    # The earlier default (Table 1 read literally): ε_base unscaled outside the blocks, blocks unchanged.
    for m_n, m_l, a in GRID:
        eq40, literal = make(name, m_n, m_l, a), make(name, m_n, m_l, a, eps_scope="blocks-only")
        for role in Role:
            expected = eq40.rule(role).eps if role.in_block else EPS
            assert math.isclose(literal.rule(role).eps, expected, rel_tol=1e-12), (name, role)


def test_eq40_eps_outside_the_blocks_at_a_known_shape():
    # Independent numbers (spec §1, Eq. 40): width 1024 = 4·256, depth 64 = 32·2, α = 1, ε_base 1e-12.
    p = Parameterization(name="alpha", alpha=1.0, width=1024, depth=64, eps_base=1e-12)
    for role in (Role.EMBEDDING, Role.POSITION_EMBEDDING, Role.UNEMBEDDING, Role.FINAL_NORM):
        assert math.isclose(p.rule(role).eps, 2.5e-13, rel_tol=1e-12), role
    for role in (Role.BLOCK_NORM, Role.HIDDEN_WEIGHT, Role.HIDDEN_BIAS):
        assert math.isclose(p.rule(role).eps, 2.5e-13 / 32, rel_tol=1e-12), role


def test_legacy_eps_scope_name_reads_as_blocks_only():
    # config.json files written before Eq. 40 became the default say "blocks"; a resume keeps their ε.
    assert Parameterization(eps_scope="blocks").eps_scope == "blocks-only"


def test_mup_reference_code_variant():
    # Authors' µP-only mode (§1 notes 3-4): ε not scaled with width, hidden WD stays λ; the rest is µP.
    for m_n, m_l in product(M_N, M_L):
        ref = make("mup", m_n, m_l, 1.0, mup_variant="reference-code")
        expected = table1("mup", m_n, m_l, 1.0)
        for role in Role:
            init, std, lr, wd, _ = expected[role]
            if role is Role.HIDDEN_WEIGHT:
                wd = LAM
            assert_rule(ref, role, (init, std, lr, wd, EPS))
        assert ref.output_multiplier == 1.0 / m_n


@pytest.mark.parametrize("name", ["sp", "alpha"])
def test_mup_variant_does_not_touch_other_parameterizations(name):
    for m_n, m_l, a in GRID:
        assert make(name, m_n, m_l, a).table() == make(name, m_n, m_l, a, mup_variant="reference-code").table()


def test_explicit_attention_scale_overrides_auto():
    for name in ("sp", "mup", "alpha"):
        assert make(name, 1, 1, 1, attn_scale="inv-d-head").attention_scale == 1.0 / D_HEAD
        assert math.isclose(make(name, 1, 1, 1, attn_scale="inv-sqrt-d-head").attention_scale, 1.0 / 8.0)


def test_base_shape_makes_mup_and_every_alpha_identical():
    # At m_N = m_L = 1 every scaling factor is 1: µP and all α give the same table and multipliers.
    ref = make("mup", 1, 1, 1.0)
    for a in ALPHAS:
        p = make("alpha", 1, 1, a)
        assert p.table() == ref.table()
        assert (p.branch_multiplier, p.output_multiplier, p.attention_scale) == (1.0, 1.0, 1.0 / D_HEAD)


# --- names, aliases and validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("param", "alpha", "expected"),
    [
        ("depth-mup", None, ("alpha", 0.5)),
        ("completep", None, ("alpha", 1.0)),
        ("CompleteP ", None, ("alpha", 1.0)),  # case and surrounding space do not matter
        ("completep", 1.0, ("alpha", 1.0)),  # agreeing with the preset is fine
        ("depth-mup", 0.5, ("alpha", 0.5)),
        ("alpha", None, ("alpha", 1.0)),  # α defaults to 1 (CompleteP)
        ("alpha", 0.75, ("alpha", 0.75)),
        ("sp", None, ("sp", 1.0)),
        ("mup", None, ("mup", 1.0)),
    ],
)
def test_resolve_name(param, alpha, expected):
    assert resolve_name(param, alpha) == expected


@pytest.mark.parametrize(("param", "alpha", "needle"), [("completep", 0.5, "0.5"), ("depth-mup", 1.0, "alpha=0.5"),
                                                        ("depth-mup", 0.75, "0.75")])
def test_resolve_name_alias_conflict(param, alpha, needle):
    with pytest.raises(ConfigError) as err:
        resolve_name(param, alpha)
    assert needle in str(err.value) and param in str(err.value)


def test_resolve_name_unknown():
    with pytest.raises(ConfigError, match="'foo'") as err:
        resolve_name("foo", None)
    assert "completep" in str(err.value)  # the message lists what is allowed


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"alpha": 0.3}, "0.3"),
        ({"alpha": 1.5}, "1.5"),
        ({"alpha": float("nan")}, "nan"),
        ({"width": 100}, "100"),  # not a multiple of d_head = 64
        ({"width": 0}, "width=0"),
        ({"depth": -1}, "depth=-1"),
        ({"base_depth": 0}, "base_depth=0"),
        ({"d_head": 0}, "d_head=0"),
        ({"lr_base": 0.0}, "lr_base=0.0"),
        ({"sigma_base": float("inf")}, "sigma_base=inf"),
        ({"wd_base": -0.1}, "wd_base=-0.1"),
        ({"eps_base": 0.0}, "eps_base=0.0"),
        ({"name": "foo"}, "'foo'"),
        ({"eps_scope": "some"}, "'some'"),
        ({"mup_variant": "paper"}, "'paper'"),
        ({"attn_scale": "inv-n"}, "'inv-n'"),
    ],
)
def test_invalid_values_raise_config_error_naming_the_value(kw, needle):
    base = {"name": "alpha", "width": 256, "depth": 2}
    with pytest.raises(ConfigError) as err:
        Parameterization(**{**base, **kw})
    assert needle in str(err.value)


def test_alpha_bounds_are_inclusive():
    assert make("alpha", 1, 8, 0.5).branch_multiplier == 8.0**-0.5
    assert make("alpha", 1, 8, 1.0).branch_multiplier == 1 / 8
