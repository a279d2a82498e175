"""Memory per process under DDP and FSDP2: the training state each rank holds, against the formula.

    torchrun --standalone --nproc-per-node 2 -m benchmarks.fsdp_memory --dist fsdp --width 256 --depth 8
    torchrun --standalone --nproc-per-node 2 -m benchmarks.fsdp_memory --dist ddp  --width 256 --depth 8

Trains `--steps` updates of the toolkit's `Trainer` (probes on at every step, so the probe step's
extra memory is included) on the CPU (gloo), then reports per rank, as one JSON line from rank 0:
- bytes of the parameters, gradients and AdamW state this rank holds (DTensor shards count their local
  part), next to the formula of docs/SCALE_OUT.md: 16·P bytes (fp32 weights, grads, two Adam moments)
  under DDP, 16·P/W (+ padding of uneven shards) under FSDP2;
- the largest whole parameters the probes' linearization held at once (θ_t and θ_{t+1} of one branch);
- peak resident memory of the process (ru_maxrss; includes torch itself, about 0.3-0.4 GB) after the
  model is built, after the last update (training and probe steps) and at the end (final checkpoint).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from probes.recorder import ProbeConfig, ProbeRecorder
from trainer.distributed import distributed, ensure_process_group, local_part
from trainer.loop import RunSpec, TrainConfig, Trainer
from trainer.model import ModelConfig
from trainer.observers import Observer
from trainer.parameterization import Parameterization


def parameter_count(width: int, depth: int, vocab: int, seq_len: int, tied: bool = False) -> int:
    """P of trainer.model.GPT: per block 12N² + 13N (attention 4N² + 6N with its LayerNorm, MLP
    8N² + 7N with its LayerNorm); embeddings V·N + T·N, final LayerNorm 2N, unembedding V·N (untied)."""
    n = width
    return depth * (12 * n * n + 13 * n) + vocab * n + seq_len * n + 2 * n + (0 if tied else vocab * n)


def local_bytes(tensors) -> int:
    return sum(local_part(t).numel() * local_part(t).element_size() for t in tensors)


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (Linux ru_maxrss, kB), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class GradientBytes(Observer):
    """Bytes of the gradients this rank holds when they are final (the loop frees them after the step),
    and the peak RSS after the last update, before the final checkpoint gathers the full state."""

    name = "gradient_bytes"

    def __init__(self):
        self.bytes, self.peak_rss_before_checkpoint_mb = 0, 0.0

    def wants(self, step: int) -> bool:
        return True

    def before_update(self, step: int, trainer: Trainer) -> None:
        self.bytes = local_bytes(p.grad for p in trainer.model.parameters() if p.grad is not None)

    def after_update(self, step: int, trainer: Trainer) -> None:
        self.peak_rss_before_checkpoint_mb = peak_rss_mb()


def measure(args: argparse.Namespace) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    param = Parameterization(width=args.width, depth=args.depth)
    spec = RunSpec(param=param, model=ModelConfig(seq_len=args.seq_len),
                   train=TrainConfig(steps=args.steps, batch_size=args.batch_size, eval_every=10**6,
                                     checkpoint_every=10**6, device="cpu", dist=args.dist, seed=0))
    out = Path(tempfile.gettempdir()) / f"fsdp_memory_{args.dist}_{args.width}_{args.depth}"
    recorder = ProbeRecorder(ProbeConfig(every=1, batch_size=2), out, spec)
    grads = GradientBytes()
    trainer = Trainer(spec, out, observers=[recorder, grads], quiet=True)
    rss_built = peak_rss_mb()  # model built on every rank (whole), then sharded or wrapped; optimizer made
    trainer.run()
    opt_state = [t for s in trainer.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    session = recorder.session
    mine = {
        "rank": rank,
        "param_bytes": local_bytes(trainer.model.parameters()),
        "grad_bytes": grads.bytes,
        "adam_bytes": local_bytes(opt_state),
        "lin_gathered_peak_bytes": session.lin_gathered_peak_bytes if session is not None else None,
        "peak_rss_after_build_mb": rss_built,
        "peak_rss_before_checkpoint_mb": grads.peak_rss_before_checkpoint_mb,
        "peak_rss_mb": peak_rss_mb(),
    }
    rows = [None] * world
    dist.all_gather_object(rows, mine)
    p = parameter_count(args.width, args.depth, 256, args.seq_len)
    return {"dist": args.dist, "world": world, "width": args.width, "depth": args.depth, "params": p,
            "predicted_state_bytes_per_rank": 16 * p // (world if args.dist == "fsdp" else 1),
            "torch": torch.__version__, "ranks": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dist", choices=("ddp", "fsdp"), default="fsdp")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with distributed("gloo", "cpu"):
        ensure_process_group(torch.device("cpu"))  # without torchrun: a group of one (the 1-process baseline)
        result = measure(args)
        if dist.get_rank() == 0:
            print(json.dumps(result))


if __name__ == "__main__":
    main()
