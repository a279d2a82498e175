"""Loss-level laziness: the block-linearized model and how much of the learning it keeps.

The block-linearized model replaces every residual branch F_l by its first-order expansion around
initialization in its own parameters,

    F_l^lin(h) = F_l(h; θ_0) + J_θ F_l(h; θ_0) · (θ_t − θ_0)          (torch.func.jvp)

evaluated on the input h that actually reaches it *in the block-linearized network* (computed
layer by layer: the stream is the surrogate's own). Everything outside the branches (embeddings,
final norm, unembedding) keeps θ_t. On a held-out batch:

    linearized_share = (loss_init − loss_linearized) / (loss_init − loss_model)

the share of the loss improvement that the lazy surrogate retains (1: every block learned only
through its linearization; theory in analyses/theory.py: 1 − share ∝ L^(α−1)). Per block, only that
block's branches are linearized (all others real), and the loss is recorded.

Because embeddings and readout keep θ_t in the surrogate, `linearized_share` also credits what they
learned (on a byte-level corpus, much of the early loss drop is bigram statistics that need no block
at all). `linearized_blocks_share` takes the blocks' own contribution as reference instead:
(loss_frozen − loss_linearized) / (loss_frozen − loss_model), where "frozen" keeps every branch at
θ_0 (F(h; θ_0) on its actual input) and the rest at θ_t.

Evaluated in float64 on the CPU, on a copy of the model (the training model is never touched).
Works through any adapter whose `sites()` give each branch's raw output (`attn_out`, `mlp_out`) and
input, and whose constructor takes the model (`type(adapter)(model)`, plus its `spec` for a
DecoderAdapter): forward hooks replace each raw branch output by F^lin of the branch input seen in the
same forward. Hugging Face branches replay the arguments (causal mask, rotary cos/sin) that the
attention receives in that same forward (`adapter.probing()`; tests/probes/test_linearized_model_hf.py).

`LinearizedModelRecorder` runs it inside training at its own cadence (default: a few log-spaced steps
and the last); `linearize_checkpoint` does it offline on a run dir's checkpoint, rebuilding θ_0 from
the run's seed. Records go to `<run dir>/linearized.zarr` (schema.LINEARIZED_STORE_NAME).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from probes.adapters import GPTAdapter, ModelAdapter
from probes.hooks import capture
from probes.linearization import parameter_jvp
from probes.schema import BRANCHES, CONFIG_NAME, LINEARIZED_STORE_NAME
from probes.store import RecordStore
from trainer.distributed import full_parameters, probes_on_every_rank
from trainer.observers import Observer

if TYPE_CHECKING:
    from trainer.loop import Trainer

# Held-out sequences the surrogate is evaluated on (float64 on a CPU, so kept small).
DEFAULT_BATCH_SIZE = 4


def lin_steps(total_steps: int, count: int = 4) -> list[int]:
    """Default cadence: up to `count` log-spaced steps in [1, last], last = total_steps − 1 (the θ that
    the last probe step sees). Empty for count 0."""
    last = total_steps - 1
    if count <= 0 or last < 1:
        return []
    if count == 1:
        return [last]
    return sorted({int(round(s)) for s in np.geomspace(1, last, num=count)})


class BlockLinearizedModel:
    """A float64 CPU copy of a model whose branches can be swapped for their linearization at θ_0."""

    def __init__(self, adapter: ModelAdapter, theta0: dict[str, torch.Tensor]):
        """`adapter`: wraps the model at θ_t (not modified: it is copied); `theta0`: model parameter
        name → θ_0 for (at least) every branch parameter."""
        model = copy.deepcopy(adapter.model).to("cpu", torch.float64).eval()
        spec = getattr(adapter, "spec", None)  # a DecoderAdapter's family description
        self.adapter = type(adapter)(model) if spec is None else type(adapter)(model, spec)
        self.depth = self.adapter.depth
        names = {id(p): n for n, p in model.named_parameters()}
        self.branches: dict[tuple[int, str], tuple[nn.Module, str, dict[str, str]]] = {}
        for layer in range(self.depth):
            for name in BRANCHES:
                module, input_site = self.adapter.branch(layer, name)
                local = {k: names[id(p)] for k, p in module.named_parameters()}
                self.branches[(layer, name)] = (module, input_site, local)
        params = dict(model.named_parameters())
        wanted = {g for *_, local in self.branches.values() for g in local.values()}
        missing = sorted(wanted - set(theta0))
        if missing:
            raise KeyError(f"θ_0 lacks branch parameters {missing[:3]}{'...' if len(missing) > 3 else ''}")
        self.theta0 = {g: theta0[g].detach().to("cpu", torch.float64) for g in wanted}
        self.theta_t = {g: params[g].detach().clone() for g in wanted}
        self._busy = False
        self._inputs: dict = {}

    def linear_branch(self, key: tuple[int, str], h: torch.Tensor) -> torch.Tensor:
        """F(h; θ_0) + J_θ F(h; θ_0)(θ_t − θ_0) for branch `key` = (layer, branch name)."""
        module, _, local = self.branches[key]
        p0 = {k: self.theta0[g] for k, g in local.items()}
        dp = {k: self.theta_t[g] - self.theta0[g] for k, g in local.items()}
        out, tangent = parameter_jvp(module, h, p0, dp)
        return out + tangent

    def frozen_branch(self, key: tuple[int, str], h: torch.Tensor) -> torch.Tensor:
        """F(h; θ_0): the branch as it was at initialization."""
        module, _, local = self.branches[key]
        return functional_call(module, {k: self.theta0[g] for k, g in local.items()}, (h,))

    def loss(self, batch: torch.Tensor, linearize: Iterable[int] = (), final_stream: bool = False,
             frozen: bool = False):
        """Held-out loss (float64) with the branches of the blocks in `linearize` replaced by F^lin
        (with `frozen`: by F(h; θ_0), the zeroth order: those blocks never learned).

        With `final_stream`, returns (loss, the final stream) instead (for tests).
        """
        layers = sorted(set(linearize))
        sites = self.adapter.sites()
        watch = {(layer, self.branches[(layer, name)][1]): sites[(layer, self.branches[(layer, name)][1])]
                 for layer in layers for name in BRANCHES}
        watch[(-1, "final_stream")] = sites[(-1, "final_stream")]
        handles = []
        try:
            for layer in layers:
                for name in BRANCHES:
                    spec = sites[(layer, f"{name}_out")]
                    if spec.where != "output":
                        raise ValueError(f"site ({layer}, {name}_out) must be a module output to be replaced")
                    handles.append(spec.module.register_forward_hook(self._replacer((layer, name), frozen)))
            # probing(): an adapter that replays its branches records their arguments in this forward
            with torch.no_grad(), self.adapter.linearizable(), self.adapter.probing(), capture(watch) as seen:
                self._inputs = seen  # the stream each branch receives in this (surrogate) forward
                loss = self.adapter.loss(batch.to("cpu")).double()
        finally:
            for handle in handles:
                handle.remove()
            self._inputs = {}
        return (loss, seen[(-1, "final_stream")]) if final_stream else loss

    def _replacer(self, key: tuple[int, str], frozen: bool = False):
        """A forward hook that returns F^lin(h) (or F(h; θ_0)) for the branch `key` in place of its output."""
        def hook(module, args, output):
            if self._busy:  # the branch's own call inside the hook (adapters whose site is the branch)
                return None
            self._busy = True
            try:
                h = self._inputs[(key[0], self.branches[key][1])]
                new = self.frozen_branch(key, h) if frozen else self.linear_branch(key, h)
            finally:
                self._busy = False
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return hook

    def measure(self, batch: torch.Tensor, loss_init: float) -> dict[str, np.ndarray]:
        """Every linearized_* variable for this θ_t (numpy, float64); `loss_init`: the model at θ_0."""
        model_loss = float(self.loss(batch))
        lin_loss = float(self.loss(batch, range(self.depth)))
        block = np.array([float(self.loss(batch, [layer])) for layer in range(self.depth)])
        frozen_loss = float(self.loss(batch, range(self.depth), frozen=True))
        gain, block_gain = loss_init - model_loss, frozen_loss - model_loss
        share = (loss_init - lin_loss) / gain if gain != 0 else math.nan
        blocks_share = (frozen_loss - lin_loss) / block_gain if block_gain != 0 else math.nan
        return {"linearized_loss": np.float64(lin_loss), "linearized_model_loss": np.float64(model_loss),
                "linearized_init_loss": np.float64(loss_init), "linearized_share": np.float64(share),
                "linearized_block_loss": block, "linearized_frozen_loss": np.float64(frozen_loss),
                "linearized_blocks_share": np.float64(blocks_share)}


def model_loss(model: nn.Module, adapter_type: type, batch: torch.Tensor) -> float:
    """Held-out loss of a whole model (float64 CPU copy), e.g. the model at θ_0."""
    m = copy.deepcopy(model).to("cpu", torch.float64).eval()
    with torch.no_grad():
        return float(adapter_type(m).loss(batch.to("cpu")))


def write_records(run_dir: Path, depth: int, steps: list[int], rows: list[dict[str, np.ndarray]],
                  attrs: dict[str, Any]) -> None:
    """Append linearized-model records to `<run_dir>/linearized.zarr`."""
    coords = {"layer": list(range(depth))}
    RecordStore(Path(run_dir) / LINEARIZED_STORE_NAME, coords, attrs).append(steps, rows)


def initial_model(spec) -> nn.Module:
    """The run's model at θ_0, rebuilt from its seed exactly as `Trainer` builds it (on the CPU; the
    global RNG state is left as it was, so training is unaffected)."""
    from trainer.model import GPT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.train.seed)
        return GPT(spec.param, spec.model)


class LinearizedModelRecorder(Observer):
    """Measures the block-linearized model inside `Trainer.run` at its own steps (θ before the update).

    θ_0 is rebuilt from the run's seed (`initial_model`), so nothing extra goes into checkpoints and a
    resumed run measures the same surrogate.
    """

    name = "linearized"

    def __init__(self, run_dir: Path, steps: Iterable[int], batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0):
        self.run_dir, self.steps = Path(run_dir), set(steps)
        self.batch_size, self.seed = batch_size, seed
        self._init: tuple[dict[str, torch.Tensor], float] | None = None  # (θ_0, loss at θ_0)

    def wants(self, step: int) -> bool:
        return step in self.steps

    def before_update(self, step: int, trainer: Trainer) -> None:
        model = trainer.eager_model
        if probes_on_every_rank(model):
            # Sharded (FSDP2): every rank takes part in gathering whole θ_t (sorted names: the same
            # collectives in the same order on every rank); rank 0 measures on a whole copy.
            params = full_parameters({n: p.detach() for n, p in sorted(model.named_parameters())})
            if not trainer.is_main:
                return
            model = initial_model(trainer.spec)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(params[name])
            del params
        elif not trainer.is_main:
            return
        batch = trainer.data.probe_batch(self.batch_size, self.seed + 1)  # held out, not the probe batch
        if self._init is None:
            init = initial_model(trainer.spec)
            self._init = ({n: p.detach() for n, p in init.named_parameters()}, model_loss(init, GPTAdapter, batch))
        theta0, init_loss = self._init
        surrogate = BlockLinearizedModel(GPTAdapter(model), theta0)
        row = surrogate.measure(batch, init_loss)
        write_records(self.run_dir, surrogate.depth, [step], [row], {"batch_size": self.batch_size})

    def resume(self, step: int) -> None:
        RecordStore(self.run_dir / LINEARIZED_STORE_NAME, {}, {}).truncate(step)


def linearize_checkpoint(run_dir: str | Path, batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0) -> dict:
    """Offline: the block-linearized model at a run dir's checkpoint, θ_0 rebuilt from the run's seed.

    Appends one record (at the checkpoint's step) to `<run_dir>/linearized.zarr` and returns it with
    the step. The checkpoint is read with weights_only=True.
    """
    from trainer import checkpoint as ckpt
    from trainer.data import TokenData
    from trainer.loop import RunSpec
    from trainer.model import GPT

    run_dir = Path(run_dir)
    spec = RunSpec.from_dict(json.loads((run_dir / CONFIG_NAME).read_text()))
    init = initial_model(spec)
    state = ckpt.load(run_dir / ckpt.CHECKPOINT_NAME, map_location="cpu")
    model = GPT(spec.param, spec.model)
    model.load_state_dict(state["model"])
    batch = TokenData(spec.data, spec.model.seq_len).probe_batch(batch_size, seed + 1)
    theta0 = {n: p.detach() for n, p in init.named_parameters()}
    surrogate = BlockLinearizedModel(GPTAdapter(model), theta0)
    row = surrogate.measure(batch, model_loss(init, GPTAdapter, batch))
    step = int(state["step"])
    store = RecordStore(run_dir / LINEARIZED_STORE_NAME, {}, {})
    store.truncate(step)  # re-running replaces the record at this step
    write_records(run_dir, surrogate.depth, [step], [row], {"batch_size": batch_size, "offline": 1})
    return {"step": step, **{k: v.tolist() for k, v in row.items()}}
