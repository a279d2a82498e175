"""Probes on Hugging Face decoders the toolkit did not build, one tiny config per family (no download).

Every check is against the model itself, located independently of the adapter (the `PARTS` table
below names each family's modules): the branch the probes linearize must reproduce the model's own
attention / MLP output at that layer in a normal forward (causal mask, rotary embeddings and GQA in
force), and its JVP must match central finite differences of the *model's* forward in float64.
"""

import copy
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the adapter tests need the optional 'hf' extra")

from analyses.load import open_run  # noqa: E402
from analyses.profile import feature_update_tables  # noqa: E402
from probes.adapters import adapter_for  # noqa: E402
from probes.decoder import DecoderAdapter, DecoderSpec  # noqa: E402
from probes.hooks import capture, count_hooks  # noqa: E402
from probes.probe_log import ProbeLog  # noqa: E402
from probes.schema import BRANCHES, SITES  # noqa: E402

SEQ = 16
COMMON = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=32)
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": lambda: transformers.LlamaConfig(**COMMON, num_key_value_heads=2),  # GQA
    "mistral": lambda: transformers.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=6),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, num_key_value_heads=2),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=8),
    "neox-parallel": lambda: transformers.GPTNeoXConfig(**COMMON, use_parallel_residual=True, rotary_pct=0.5),
    "neox-sequential": lambda: transformers.GPTNeoXConfig(**COMMON, use_parallel_residual=False),
    "phi": lambda: transformers.PhiConfig(**COMMON),  # not built in: described by the README's spec below
}

# The README's example, verbatim: a family the toolkit does not know (Phi: attention and MLP in parallel
# behind one LayerNorm, partial rotary), described in a DecoderSpec.
README_SPEC = DecoderSpec(
    blocks="model.layers",                                   # the list of blocks
    attn="self_attn", attn_norm="input_layernorm",           # attention and the norm it reads
    mlp="mlp", mlp_norm="input_layernorm",                   # MLP and its norm (shared here)
    final_norm="model.final_layernorm", embedding="model.embed_tokens",
    attn_out_proj="dense", mlp_out_proj="fc2",               # output projections (internal sites)
    parallel_residual=True,                                  # both branches read the block input
)
SPECS = {"phi": README_SPEC}


def _llama_parts(m, l):
    b = m.model.layers[l]
    return b.input_layernorm, b.self_attn, b.post_attention_layernorm, b.mlp


def _neox_parts(m, l):
    b = m.gpt_neox.layers[l]
    return b.input_layernorm, b.attention, b.post_attention_layernorm, b.mlp


# family → block l's (attention norm, attention, MLP norm, MLP), found without the adapter
PARTS = {
    "gpt2": lambda m, l: (m.transformer.h[l].ln_1, m.transformer.h[l].attn, m.transformer.h[l].ln_2,
                          m.transformer.h[l].mlp),
    "llama": _llama_parts, "mistral": _llama_parts, "qwen2": _llama_parts, "qwen3": _llama_parts,
    "neox-parallel": _neox_parts, "neox-sequential": _neox_parts,
    "phi": lambda m, l: (m.model.layers[l].input_layernorm, m.model.layers[l].self_attn,
                         m.model.layers[l].input_layernorm, m.model.layers[l].mlp),
}
PARALLEL = {"neox-parallel", "phi"}


def make_adapter(model, family: str):
    return adapter_for(model, spec=SPECS.get(family))


# Qwen3's RMSNorm on queries and keys computes in float32 even in a float64 model, so its own attention
# output carries float32 round-off (~1e-7 relative) that a 1e-5 difference step amplifies to 1e-3; a
# larger step keeps the finite difference informative (measured: 1.4e-5 at 1e-3). Other families: exact.
FD_STEP_AND_TOLERANCE = {"qwen3": (1e-3, 1e-4)}


def build(family: str, dtype=torch.float64):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]())
    return model.to(dtype)


def tokens(seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (batch, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def own_branches(model, family, batch):
    """Normal forward (the model's default attention): each branch's input and output, by hooks on the
    model's own norm and attention/MLP modules."""
    found, handles = {}, []

    def keep(key, value):
        found[key] = (value[0] if isinstance(value, tuple) else value).detach()

    for layer in range(model.config.num_hidden_layers):
        attn_norm, attn, mlp_norm, mlp = PARTS[family](model, layer)
        for name, norm, module in (("attn", attn_norm, attn), ("mlp", mlp_norm, mlp)):
            handles.append(norm.register_forward_pre_hook(lambda m, a, k=(layer, name, "in"): keep(k, a)))
            handles.append(module.register_forward_hook(lambda m, a, o, k=(layer, name, "out"): keep(k, o)))
    try:
        with torch.no_grad():
            model(batch[:, :-1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return found


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request):
    return request.param


def test_an_unknown_family_gets_one_clear_error():
    model = build("phi")
    with pytest.raises(LookupError, match="no probe adapter for PhiForCausalLM .*model_type 'phi'.*DecoderSpec"):
        adapter_for(model)
    bad = DecoderSpec(**{**README_SPEC.__dict__, "blocks": "model.blocks"})
    with pytest.raises(LookupError, match="DecoderSpec.blocks='model.blocks': 'model' has no submodule 'blocks'"):
        adapter_for(model, spec=bad)


def test_branch_replays_the_models_own_branch(family):
    """(1) The linearized branch, fed the captured input, is the model's own branch output."""
    model = build(family)
    batch = tokens(1)
    own = own_branches(model, family, batch)
    adapter = make_adapter(model, family)
    assert isinstance(adapter, DecoderAdapter)
    with torch.no_grad(), adapter.probing():
        adapter.loss(batch)  # the probe forward: records each branch module's arguments
    assert count_hooks(model) == 0
    with torch.no_grad(), adapter.linearizable():
        for layer in range(adapter.depth):
            for name in BRANCHES:
                branch, _ = adapter.branch(layer, name)
                h, out = own[(layer, name, "in")], own[(layer, name, "out")]
                assert rel(branch(h), out) <= 1e-6, (family, layer, name)
                # the linearization may use the first sequence only: per-sequence arguments follow
                assert rel(branch(h[:1]), out[:1]) <= 1e-6, (family, layer, name)


def test_stream_identities_at_the_sites(family):
    """(2) resid_mid = resid_pre + attn_add, resid_post = resid_mid + mlp_add (parallel residual:
    resid_post = resid_pre + attn_add + mlp_add and no resid_mid)."""
    model = build(family)
    adapter = make_adapter(model, family)
    with torch.no_grad(), capture(adapter.sites()) as acts:
        adapter.loss(tokens(2))
    parallel = family in PARALLEL
    assert adapter.parallel is parallel
    for layer in range(adapter.depth):
        a = {s: acts.get((layer, s)) for s in SITES}
        if parallel:
            assert a["resid_mid"] is None
            torch.testing.assert_close(a["resid_post"], a["resid_pre"] + a["attn_add"] + a["mlp_add"])
        else:
            torch.testing.assert_close(a["resid_mid"], a["resid_pre"] + a["attn_add"])
            torch.testing.assert_close(a["resid_post"], a["resid_mid"] + a["mlp_add"])
    torch.testing.assert_close(acts[(-1, "embed")], acts[(0, "resid_pre")])
    # internal sites: the output projections, applied to what was read there, give the branch outputs
    inner = {(layer, k): spec for layer in range(adapter.depth) for k, spec in adapter.internal_sites(layer).items()}
    with torch.no_grad(), capture(inner) as found:
        adapter.loss(tokens(2))
    for (layer, key), spec in inner.items():
        branch = "mlp_out" if key == "mlp_hidden" else "attn_out"
        torch.testing.assert_close(spec.module(found[(layer, key)]), acts[(layer, branch)])
    torch.testing.assert_close(acts[(-1, "final_stream")], acts[(adapter.depth - 1, "resid_post")])


def model_branch_output(model, family, batch, key, params, direction, step):
    """The model's own branch output at `key` = (layer, branch) with its parameters moved by step·direction."""
    with torch.no_grad():
        for k, p in params.items():
            p.add_(step * direction[k])
        try:
            return own_branches(model, family, batch)[(*key, "out")]
        finally:
            for k, p in params.items():
                p.sub_(step * direction[k])


def test_jvp_matches_finite_differences_of_the_model(family):
    """(3) Forward-mode JVP of the replayed branch = central differences of the model's own forward."""
    model = build(family)
    batch = tokens(3)
    adapter = make_adapter(model, family)
    own = own_branches(model, family, batch)
    with torch.no_grad(), adapter.probing():
        adapter.loss(batch)
    layer = 1
    eps, tolerance = FD_STEP_AND_TOLERANCE.get(family, (1e-5, 1e-6))
    for name in BRANCHES:
        branch, _ = adapter.branch(layer, name)
        params = dict(branch.named_parameters())
        gen = torch.Generator().manual_seed(4)
        direction = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) * (v.detach().abs().mean() + 1e-2)
                     for k, v in params.items()}
        h = own[(layer, name, "in")]
        with adapter.linearizable():
            primal = {k: v.detach() for k, v in params.items()}
            _, jvp = torch.func.jvp(lambda p, b=branch, x=h: torch.func.functional_call(b, p, (x,)),
                                    (primal,), (direction,))
        plus, minus = (model_branch_output(model, family, batch, (layer, name), params, direction, s * eps)
                       for s in (1.0, -1.0))
        fd = (plus - minus) / (2 * eps)
        assert rel(jvp, fd) < tolerance, (family, name, rel(jvp, fd))


def test_probes_leave_training_unchanged_and_analyses_read_the_store(family, tmp_path):
    """(4) Training with probes on is bitwise the training without; (5) analyses.open_run reads it."""
    runs = {}
    for probed in (False, True):
        model = build(family, torch.float32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        log = ProbeLog(make_adapter(model, family), tokens(5), tmp_path / family, lin_batch_size=1) if probed else None
        for step in range(3):
            batch = tokens(10 + step, batch=4)
            loss = model(batch[:, :-1], labels=batch[:, :-1]).loss
            loss.backward()
            if log is None:
                optimizer.step()
            else:
                with log.update(step, optimizer, train_loss=loss):
                    optimizer.step()
            optimizer.zero_grad()
        if log is not None:
            log.close()
        runs[probed] = copy.deepcopy(model.state_dict())
        assert count_hooks(model) == 0
    for name, value in runs[False].items():
        assert torch.equal(value, runs[True][name]), name
    ds = open_run(tmp_path / family)
    assert list(ds.step.values) == [0, 1, 2]
    ratio = ds.lin_ratio.values
    assert ratio.shape == (3, 2, 2) and (ratio > 0).all() and (ratio < 1).all()
    mid = ds.act_rms.sel(site="resid_mid").values
    if family in PARALLEL:
        assert torch.isnan(torch.from_numpy(mid)).all()
        assert "resid_mid" not in feature_update_tables(ds)  # the analyses leave the absent site out
    else:
        assert (mid > 0).all()
    assert (ds.branch_to_stream.values > 0).all()


def test_the_readme_shows_the_spec_that_is_tested():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme[readme.index("spec = DecoderSpec(\n"):]
    block = block[: block.index("\n)\n") + 2].splitlines()[1:]
    source = Path(__file__).read_text()
    assert len(block) == 7 and all(line in source for line in block), block
