"""The trainer's AdamW runs `foreach` on CPU (less per-tensor Python overhead at small widths); it must give
the same parameters, bit for bit, as PyTorch's default single-tensor loop."""

import torch

from trainer.model import GPT, ModelConfig
from trainer.optim import build_optimizer
from trainer.parameterization import Parameterization


def test_foreach_adamw_is_bitwise_the_single_tensor_loop():
    param = Parameterization(name="alpha", alpha=1.0, width=64, depth=3, wd_base=0.1)
    models, optimizers = [], []
    for foreach in (True, False):
        torch.manual_seed(0)
        model = GPT(param, ModelConfig(seq_len=16))
        opt = build_optimizer(model, param, model.parameter_roles())
        assert all(g["foreach"] for g in opt.param_groups)  # what the trainer gets
        for g in opt.param_groups:
            g["foreach"] = foreach
        models.append(model)
        optimizers.append(opt)
    tokens = torch.randint(0, 256, (5, 4, 17), generator=torch.Generator().manual_seed(1))
    for batch in tokens:
        for model, opt in zip(models, optimizers):
            model(batch[:, :-1], batch[:, 1:]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), name
