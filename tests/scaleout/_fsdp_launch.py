"""One torchrun launch for the FSDP2 tests (one start-up for two runs): first a user's own plain FSDP2
training loop wrapped in `ProbeLog`, then `diagnose run --dist fsdp` with the arguments given.

    torchrun --nproc-per-node 2 _fsdp_launch.py LOOP_DIR run --dist fsdp ... --out RUN_DIR

`user_loop(dir, shard=False)` is the same loop as one plain process: the reference the test compares with.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from probes.adapters import GPTAdapter
from probes.probe_log import ProbeLog
from trainer.data import DataConfig, TokenData
from trainer.distributed import full_parameters, squared_norms
from trainer.model import GPT, ModelConfig
from trainer.parameterization import Parameterization

LOOP_STEPS, LOOP_PROBES = 10, (0, 1, 2, 5, 9)
BATCH, SEQ = 8, 16


def user_loop(out: Path, shard: bool) -> None:
    """What a user writes: build, (shard), AdamW, loss.backward(), `with log.update(...)`: optimizer.step()."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(0)
    model = GPT(Parameterization(width=64, depth=2), ModelConfig(seq_len=SEQ))
    if shard:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, eps=1e-8)
    data = TokenData(DataConfig(), SEQ)
    log = ProbeLog(GPTAdapter(model), data.probe_batch(2, 0), out, steps=LOOP_PROBES,
                   attrs={"param": "alpha", "alpha": 1.0, "width": 64, "depth": 2})
    losses = []
    for step in range(LOOP_STEPS):
        batch = data.train_batch(0, step, BATCH, rank, world)  # this rank's share of the global batch
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        mean_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
        with log.update(step, optimizer=optimizer, train_loss=mean_loss):
            optimizer.step()
        optimizer.zero_grad()
        losses.append(mean_loss.item())
    log.close()
    session = log.session
    # Σx² of one tensor three ways: sharded (local sums + one all-reduce), whole (a plain tensor, the
    # same on every rank: must not be summed over ranks) and directly in float64.
    weight = model.blocks[0].mlp_branch.fc.weight.detach()
    whole = full_parameters({"w": weight})["w"]
    facts = {"losses": losses, "lin_gathered_peak_bytes": session.lin_gathered_peak_bytes,
             "lin_branches_here": [list(k) for k in session.lin_branches_here],
             "squared_norms": squared_norms([weight, whole]).tolist(),
             "direct_sum_of_squares": whole.double().pow(2).sum().item()}
    everyone = [None] * world
    if world > 1:
        dist.all_gather_object(everyone, facts)
    else:
        everyone = [facts]
    if rank == 0:
        (out / "loop.json").write_text(json.dumps(everyone))


if __name__ == "__main__":
    dist.init_process_group("gloo")  # kept for `diagnose run`, which joins an existing group
    torch.set_num_threads(1)
    user_loop(Path(sys.argv[1]), shard=True)
    from diagnose.cli import main

    main(sys.argv[2:])
