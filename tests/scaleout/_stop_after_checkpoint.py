"""Launched by torchrun in tests: `diagnose ...`, but every rank dies hard right after the first checkpoint.

Simulates a job killed mid-run (node failure, preemption): nothing after the checkpoint is cleaned up.
"""

import os
import sys

import torch.distributed as dist

from diagnose.cli import main
from trainer import loop

_save = loop.Trainer.save_checkpoint


def _save_then_die(self):
    _save(self)
    if dist.is_initialized():
        dist.barrier()  # rank 0 has the checkpoint on disk before anyone dies
    sys.stdout.flush()
    os._exit(17)


loop.Trainer.save_checkpoint = _save_then_die

if __name__ == "__main__":
    main()
