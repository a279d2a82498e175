"""`ProbeCallback` in a real Hugging Face `Trainer` on a tiny Llama (CPU, a few steps, no download)."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Trainer callback needs the optional 'hf' extra")
pytest.importorskip("accelerate", reason="the Hugging Face Trainer needs accelerate (extra 'hf-trainer')")

from analyses.load import open_run  # noqa: E402
from probes.hf_callback import ProbeCallback  # noqa: E402
from probes.hooks import count_hooks  # noqa: E402

STEPS = 4


def train(tmp_path, callbacks) -> dict[str, torch.Tensor]:
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 256, (4 * STEPS, 16), generator=gen)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        max_grad_norm=1.0, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    assert count_hooks(model) == 0
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trainer_callback_records_probes_and_leaves_training_bitwise_unchanged(tmp_path):
    probe_batch = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(2))
    plain = train(tmp_path / "plain", [])
    probed = train(tmp_path / "probed", [ProbeCallback(probe_batch, tmp_path / "run", steps=[0, 1, 3])])
    for name, value in plain.items():
        assert torch.equal(value, probed[name]), name
    ds = open_run(tmp_path / "run")
    assert list(ds.step.values) == [0, 1, 3]
    assert ds.attrs["lr"] == 1e-2 and ds.attrs["depth"] == 2 and ds.attrs["width"] == 32
    assert (ds.lin_ratio.values > 0).all() and (ds.lin_ratio.values < 1).all()
    # the recorded effective LR is the scheduler's (linear decay from the peak)
    lrs = ds.effective_lr.values[:, 0]
    assert lrs[0] == pytest.approx(1e-2) and lrs[0] > lrs[1] > lrs[2] > 0
    assert (ds.update_rel.sel(step=1, block_role="hidden_weight").values > 0).all()
