"""One model under observation: the measurements of a probe step, around one optimizer update.

    session = ProbeSession(adapter, probe_batch)
    session.before_update(step)   # θ_t: activations on the probe batch, stream gradients, θ_t snapshot
    optimizer.step()
    values = session.after_update(step)   # θ_{t+1}: Δθ, linearization error, every statistic

Probes run their own forward (and backward) on a fixed probe batch through the eager module; the
training step is never hooked. Nothing here touches `.grad` of a parameter or any RNG, so training
is bitwise the same with probes on or off. Values stay on the device until the caller transfers them.

Sharded parameters (FSDP2): every rank calls `before_update`/`after_update` (a forward of a sharded
model is a collective). Each rank runs the probe forward/backward on the whole probe batch, so the
activation statistics need no reduction; sums over parameters add the ranks' shards in one
all-reduce (`trainer.distributed.squared_norms`); the linearization all-gathers θ_t and θ_{t+1} of
one branch at a time, the branches are split over the ranks by size, and their norms summed
across ranks once. Every rank ends with the same values; the caller decides who records them.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from probes.adapters import ModelAdapter
from probes.feature_change import FeatureChange
from probes.health import HEADS_KEY, health_statistics, internal_sites, internal_statistics
from probes.hooks import capture
from probes.linearization import LinearizationResult, branch_linearization
from probes.schema import BRANCHES, SITES
from probes.statistics import USER_STATISTICS, ProbeContext, builtin_statistics
from trainer.distributed import full_parameters, my_share, probes_on_every_rank, sum_across_ranks


class ProbeSession:
    """Holds the probe batch and the reference activations (step 0 and the previous probe step)."""

    def __init__(self, adapter: ModelAdapter, probe_batch: torch.Tensor, dtype: torch.dtype = torch.float64,
                 lin_batch_size: int | None = None, feature_batch_size: int | None = None,
                 health: bool = True, health_every: int = 1):
        """`lin_batch_size`: evaluate the linearization error on the first that many sequences of the
        probe batch only (None: all); `feature_batch_size`: the same for the feature change since
        θ_0 (probes.feature_change); every other statistic uses the whole batch. `health`: also record
        the training-health statistics (probes.health); `health_every`: all of them
        only at steps that are multiples of it (NaN at the other probe steps)."""
        if lin_batch_size is not None and lin_batch_size <= 0:
            raise ValueError(f"lin_batch_size={lin_batch_size} must be positive (or None for the whole batch)")
        self.adapter, self.batch, self.dtype = adapter, probe_batch, dtype
        self.lin_batch_size = lin_batch_size
        self.health, self.health_every = health, health_every
        self.ref0: dict[tuple[int, str], torch.Tensor] | None = None
        self.prev: dict[tuple[int, str], torch.Tensor] | None = None
        self.roles = adapter.parameter_roles()
        self.layers = {n: adapter.layer_of(n) for n in self.roles}
        self._global_names = {id(p): n for n, p in adapter.model.named_parameters()}
        self._branches: list[tuple[tuple[int, str], torch.nn.Module, str, dict[str, str]]] | None = None
        self._sharded, self._mine = False, set()  # set with _branches (the model's sharding, this rank's branches)
        self._pending: dict[str, Any] | None = None
        self.features = FeatureChange(adapter, feature_batch_size)  # keeps θ_0 of the blocks
        # Sharded parameters: the most bytes of whole (gathered) parameters held at once by the
        # linearization, θ_t and θ_{t+1} of one branch; and which branches this rank evaluated.
        self.lin_gathered_peak_bytes = 0
        self.lin_branches_here: list[tuple[int, str]] = []
        self.stat_state: dict[str, torch.Tensor] = {}  # statistics' memory between probe steps (warm starts)

    def before_update(self, step: int) -> None:
        """Measure at θ_t: activations, the stream gradients and a snapshot of θ_t."""
        model = self.adapter.model
        was_training = model.training
        model.eval()  # no dropout (and no RNG use) in a probe forward
        try:
            full = self.health and self._full_health(step)
            with torch.enable_grad(), capture(self.adapter.sites()) as acts, \
                    capture(internal_sites(self.adapter) if full else {}) as inner, self.adapter.probing():
                loss = self.adapter.loss(self.batch)
                pre = [acts[(l, "resid_pre")] for l in range(self.adapter.depth)]
                grads = torch.autograd.grad(loss, pre) if loss.requires_grad else [torch.zeros_like(p) for p in pre]
        finally:
            model.train(was_training)
        self._pending = {
            "step": step,
            "acts": self._fill_absent({k: v.detach().float().clone() for k, v in acts.items()}),
            "grads": [g.detach() for g in grads],
            "loss": loss.detach(),
            "before": {n: p.detach().clone() for n, p in model.named_parameters()},
            # reduced here, at θ_t, instead of kept: the MLP hidden layer is 4× the stream's width
            "extras": {"internal": internal_statistics(inner, self.adapter.depth)} if full else {},
        }

    def _full_health(self, step: int) -> bool:
        """Whether this step records the attention and activation statistics too (their cadence)."""
        return step % self.health_every == 0 or HEADS_KEY not in self.stat_state

    def after_update(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
        """Measure Δθ = θ_{t+1} − θ_t: linearization error and every statistic (device tensors).

        `optimizer`: the one that made the update, for the Adam-state statistics (None: NaN)."""
        if self._pending is None or self._pending["step"] != step:
            raise RuntimeError(f"after_update({step}) without a matching before_update")
        pending, self._pending = self._pending, None
        model = self.adapter.model
        after = {n: p.detach() for n, p in model.named_parameters()}
        lin = self.linearization(pending["acts"], pending["before"], after)
        acts = pending["acts"]
        if self.ref0 is None:
            self.ref0 = acts
        ctx = ProbeContext(
            step=step, depth=self.adapter.depth, acts=acts, ref0=self.ref0, prev=self.prev,
            grads=pending["grads"], probe_loss=pending["loss"], linearization=lin,
            params_before=pending["before"], params_after=after, roles=self.roles, layers=self.layers,
            branch_inputs={name: self.adapter.branch(0, name)[1] for name in BRANCHES},
            adapter=self.adapter, optimizer=optimizer, batch=self.batch, state=self.stat_state,
            extras=pending["extras"],
        )
        values = builtin_statistics(ctx)
        if self.health:
            values.update(health_statistics(ctx, full=self._full_health(step)))
        values["probe_loss"] = pending["loss"].float()
        if self.features.theta0 is None:  # the first probe step's θ_t is the reference θ_0
            self.features.set_reference(pending["before"])
        values.update({k: v.float() for k, v in self.features.measure(acts, pending["before"]).items()})
        for name, stat in USER_STATISTICS.items():
            values[name] = stat.fn(ctx)
        self.prev = acts
        return values

    def linearization(
        self,
        acts: dict[tuple[int, str], torch.Tensor],
        params_before: dict[str, torch.Tensor],
        params_after: dict[str, torch.Tensor],
    ) -> dict[tuple[int, str], LinearizationResult]:
        """Linearization error of every branch of every layer, each at its input site in `acts`.

        `params_*` map model parameter names to θ_t and θ_{t+1}; evaluated in `self.dtype`, on the first
        `self.lin_batch_size` sequences (all when None; branches act on each sequence alone). This is
        most of a probe step's cost: per branch, the JVP (primal and tangent) and F(θ + Δθ), in
        float64 by default (see benchmarks/RESULTS.md); in float32 also one float64 F(θ) for the
        round-off floor (probes/linearization.py).
        """
        model = self.adapter.model
        if self._branches is None:  # branch modules, their parameter names and the sharding never change
            self._branches = []
            for layer in range(self.adapter.depth):
                for name in BRANCHES:
                    branch, input_site = self.adapter.branch(layer, name)
                    self._branches.append(((layer, name), branch, input_site, self._local_names(branch)))
            self._sharded = probes_on_every_rank(model)
            # Split by cost (∝ the branch's parameter count) so that MLP branches do not pile up on one rank.
            self._mine = my_share([sum(p.numel() for p in b.parameters()) for _, b, _, _ in self._branches], model)
        lin = {}
        sharded, mine = self._sharded, self._mine
        with self.adapter.linearizable():
            for i, (key, branch, input_site, local) in enumerate(self._branches):
                # Whole tensors of this branch only (sharded: an all-gather every rank takes part in).
                before = full_parameters({k: params_before[g] for k, g in local.items()})
                after = full_parameters({k: params_after[g] for k, g in local.items()})
                if sharded:
                    held = sum(t.numel() * t.element_size() for t in (*before.values(), *after.values()))
                    self.lin_gathered_peak_bytes = max(self.lin_gathered_peak_bytes, held)
                if i in mine:
                    lin[key] = branch_linearization(
                        branch, acts[(key[0], input_site)][: self.lin_batch_size], before, after, dtype=self.dtype,
                    )
                del before, after  # free this branch's whole tensors before gathering the next
        self.lin_branches_here = list(lin)
        if sharded:
            lin = self._share(lin)
        return lin

    def _share(self, lin: dict[tuple[int, str], LinearizationResult]) -> dict[tuple[int, str], LinearizationResult]:
        """Every branch's norms on every rank: each rank fills its own rows, one sum across ranks."""
        keys = [key for key, *_ in self._branches]
        names = [f.name for f in fields(LinearizationResult)]  # every stored norm (a NaN floor stays NaN)
        table = torch.zeros(len(keys), len(names), dtype=torch.float64, device=self.batch.device)
        for i, key in enumerate(keys):
            if key in lin:
                table[i] = torch.stack([getattr(lin[key], n).to(table.dtype) for n in names])
        table = sum_across_ranks(table)
        return {key: LinearizationResult(*table[i].unbind()) for i, key in enumerate(keys)}
    @staticmethod
    def _fill_absent(acts: dict[tuple[int, str], torch.Tensor]) -> dict[tuple[int, str], torch.Tensor]:
        """A site the model does not have (`resid_mid` of a parallel-residual block) reads as NaN."""
        layers = {layer for layer, _ in acts if layer >= 0}
        for layer in layers:
            for site in SITES:
                if (layer, site) not in acts:
                    acts[(layer, site)] = torch.full_like(acts[(layer, "resid_pre")], float("nan"))
        return acts

    def _local_names(self, branch: torch.nn.Module) -> dict[str, str]:
        """Branch-local parameter name → model parameter name (matched by identity, not by string)."""
        return {k: self._global_names[id(p)] for k, p in branch.named_parameters()}

    def state_dict(self) -> dict[str, Any]:
        """References for resume: {"ref0": [...], "prev": [...]} as lists of tensors in site order."""
        keys = sorted(self.adapter.sites())
        pack = lambda d: None if d is None else [d[k].cpu() for k in keys]  # noqa: E731
        return {"ref0": pack(self.ref0), "prev": pack(self.prev), "theta0": self.features.state_dict(),
                "stat_state": {k: v.cpu() for k, v in self.stat_state.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = sorted(self.adapter.sites())
        device = self.batch.device
        unpack = lambda v: None if v is None else {k: t.to(device) for k, t in zip(keys, v)}  # noqa: E731
        self.ref0, self.prev = unpack(state.get("ref0")), unpack(state.get("prev"))
        self.ref0, self.prev = (None if d is None else self._fill_absent(d) for d in (self.ref0, self.prev))
        self.features.load_state_dict(state.get("theta0"), device)
        self.stat_state = {k: v.to(device) for k, v in state.get("stat_state", {}).items()}
