import pytest
import torch

from trainer.loop import RunSpec, TrainConfig
from trainer.model import ModelConfig
from trainer.parameterization import Parameterization


@pytest.fixture(autouse=True)
def _one_thread():
    # Two shared cores: one thread per test process keeps timings stable and CPU math deterministic.
    torch.set_num_threads(1)


def tiny_spec(steps: int = 8, depth: int = 2, alpha: float = 1.0, **train) -> RunSpec:
    param = Parameterization(name="alpha", alpha=alpha, width=64, depth=depth, base_width=64, lr_base=2**-8)
    train_cfg = TrainConfig(steps=steps, batch_size=4, eval_every=4, eval_batches=1, checkpoint_every=4,
                            log_every=2, **train)
    return RunSpec(param=param, model=ModelConfig(seq_len=32), train=train_cfg)
