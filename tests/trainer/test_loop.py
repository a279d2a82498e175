"""The training loop on CPU: it learns, resumes bitwise, stops cleanly on NaN, accumulates, schedules."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import checkpoint as ckpt
from trainer.data import DataConfig
from trainer.errors import ConfigError
from trainer.loop import NonFiniteLoss, RunSpec, TrainConfig, Trainer, truncate_metrics, validate_train
from trainer.model import ModelConfig
from trainer.observers import Observer
from trainer.optim import lr_factor
from trainer.parameterization import Parameterization


def spec(data: Path | str = "shakespeare", width=64, depth=2, lr=2**-8, seq_len=32, **train) -> RunSpec:
    """A tiny CompleteP run at its base shape (m_N = m_L = 1) on CPU."""
    param = Parameterization(name="alpha", alpha=1.0, width=width, depth=depth, base_width=width, base_depth=2,
                             lr_base=lr)
    defaults = dict(steps=8, batch_size=4, eval_every=4, eval_batches=1, checkpoint_every=4, log_every=2,
                    device="cpu")
    return RunSpec(param=param, model=ModelConfig(seq_len=seq_len), data=DataConfig(source=str(data)),
                   train=TrainConfig(**{**defaults, **train}))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def load_ckpt(run_dir: Path) -> dict:
    # weights_only=True: a checkpoint must load without unpickling arbitrary code.
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


class Snapshot(Observer):
    """Keeps copies of the gradients and parameters around the update of the steps it is given."""

    name = "snapshot"

    def __init__(self, steps):
        self.steps, self.grads, self.before, self.after = set(steps), {}, {}, {}

    def wants(self, step):
        return step in self.steps

    def before_update(self, step, trainer):
        named = list(trainer.model.named_parameters())
        self.grads[step] = {n: p.grad.detach().clone() for n, p in named}
        self.before[step] = {n: p.detach().clone() for n, p in named}

    def after_update(self, step, trainer):
        self.after[step] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


class Crash(Observer):
    """Simulates the process dying in the middle of update `step` (after the last checkpoint)."""

    name = "crash"

    def __init__(self, step):
        self.step = step

    def wants(self, step):
        return step == self.step

    def before_update(self, step, trainer):
        raise KeyboardInterrupt(f"killed at step {step}")


# --- (a) it learns ---------------------------------------------------------------------------------------


def test_loss_falls_below_the_unigram_entropy(tmp_path):
    # Threshold: the entropy of the corpus' byte unigram distribution (≈ 3.3 nats), computed here from
    # the tokens. A model that only learned byte frequencies cannot beat it; a held-out loss below it
    # means the model uses context. Starting point: uniform logits give ln 256 ≈ 5.55. Measured after
    # 150 steps (≈ 5 s on one core): 2.62 at seed 0, 2.79–2.85 at seeds 1–2; the 0.2-nat margin is far
    # above the ≈ 0.03 standard error of a 4-batch validation loss.
    trainer = Trainer(spec(lr=2**-8, seq_len=64, steps=150, batch_size=16, eval_every=150, eval_batches=4,
                           checkpoint_every=150, log_every=50), tmp_path / "run", quiet=True)
    counts = np.bincount(trainer.data.tokens, minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())
    assert 3.0 < unigram_entropy < 3.6  # sanity: English bytes, well below ln 256
    result = trainer.run()
    vals = [m["val_loss"] for m in read_metrics(tmp_path / "run") if "val_loss" in m]
    assert abs(vals[0] - math.log(256)) < 0.1  # step 0: (nearly) uniform prediction
    assert result["val_loss"] == vals[-1]
    assert result["val_loss"] < unigram_entropy - 0.2, (result["val_loss"], unigram_entropy)


# --- (b) resume is bitwise exact ------------------------------------------------------------------------


def test_resume_is_bitwise_exact(tmp_path, small_text_file):
    n = 8
    s = spec(small_text_file, steps=n, checkpoint_every=n // 2, eval_every=n // 2, log_every=1)
    Trainer(s, tmp_path / "whole", quiet=True).run()

    # Second run: dies in update n/2 + 1, after the checkpoint at n/2 and after the metric lines of
    # step n/2 were written (log_every=1); a new Trainer resumes from the checkpoint.
    with pytest.raises(KeyboardInterrupt):
        Trainer(s, tmp_path / "split", observers=[Crash(n // 2 + 1)], quiet=True).run()
    crashed = read_metrics(tmp_path / "split")
    assert any(m["step"] == n // 2 and "loss" in m for m in crashed)  # lines past the checkpoint exist
    assert load_ckpt(tmp_path / "split")["step"] == n // 2
    # The crash is recorded (a SIGKILL would leave "running"); either way the checkpoint allows --resume.
    assert json.loads((tmp_path / "split" / "status.json").read_text())["state"] == "failed"
    Trainer(s, tmp_path / "split", quiet=True).run(resume=True)

    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    # Same lines in the same order (no duplicates of the re-run steps), bitwise-equal losses (JSON
    # floats round-trip exactly); only the throughput differs.
    drop = lambda rows: [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in rows]
    assert drop(split) == drop(whole)
    assert [m["step"] for m in whole if "loss" in m] == list(range(n))
    a, b = load_ckpt(tmp_path / "whole"), load_ckpt(tmp_path / "split")
    assert a["step"] == b["step"] == n
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.loads((tmp_path / "split" / "status.json").read_text())["state"] == "finished"


def test_resume_without_checkpoint_is_a_config_error(tmp_path, small_text_file):
    with pytest.raises(ConfigError, match="checkpoint"):
        Trainer(spec(small_text_file), tmp_path / "none", quiet=True).run(resume=True)


def test_truncate_metrics_drops_lines_at_and_after_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "val_loss": 5.5}, {"step": 0, "loss": 5.0}, {"step": 1, "loss": 4.0},
            {"step": 2, "val_loss": 3.5}, {"step": 2, "loss": 3.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    truncate_metrics(path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:3]


# --- (c) a NaN loss stops the run cleanly ----------------------------------------------------------------


def nan_run(run: Path, data: Path, lr: float, checkpoint_every: int) -> int:
    """Train with an absurd η_base until the loss is non-finite; return the step the error names."""
    s = spec(data, lr=lr, steps=40, schedule="constant", warmup_frac=0.0, checkpoint_every=checkpoint_every,
             log_every=1, eval_every=1000)
    with pytest.raises(NonFiniteLoss) as err:
        Trainer(s, run, quiet=True).run()
    return int(re.search(r"step (\d+)", str(err.value)).group(1))


def test_non_finite_loss_stops_cleanly(tmp_path, small_text_file):
    # η_base = 1e6 with Adam moves every parameter by ~1e6 in the first update: the next forward pass
    # overflows and the loss is NaN. A checkpoint is written after every good step.
    run = tmp_path / "nan"
    bad = nan_run(run, small_text_file, lr=1e6, checkpoint_every=1)
    assert bad >= 1, "the first update must be finite for this test to mean anything"

    metrics = [m for m in read_metrics(run) if "loss" in m]
    assert [m["step"] for m in metrics] == list(range(bad + 1))  # nothing written after the bad step
    assert all(math.isfinite(m["loss"]) for m in metrics[:-1]) and not math.isfinite(metrics[-1]["loss"])

    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and f"step {bad}" in status["message"] and status["bad_step"] == bad

    # The checkpoint is the last one written before the bad step, loads safely, and is finite.
    state = load_ckpt(run)
    assert state["step"] == bad
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not list(run.glob(".checkpoint.pt.tmp*"))  # no half-written file left behind


def test_non_finite_gradient_stops_before_a_bad_checkpoint(tmp_path, small_text_file):
    # η_base = 1e4: the loss grows to ~1e9–1e10 (finite) while the gradient norm overflows to inf from
    # step 1 and to NaN a few steps later; the loss itself becomes NaN only after the NaN update.
    run = tmp_path / "nan"
    bad = nan_run(run, small_text_file, lr=1e4, checkpoint_every=1)
    metrics = [m for m in read_metrics(run) if "loss" in m]
    # Every step the run accepted had a finite gradient norm...
    assert all(math.isfinite(m["grad_norm"]) for m in metrics if m["step"] < bad)
    # ...so the kept checkpoint (one per step here) cannot hold NaN parameters.
    state = load_ckpt(run)
    assert state["step"] <= bad
    assert all(torch.isfinite(t).all() for t in state["model"].values())


# --- (d) checkpoints -------------------------------------------------------------------------------------


def test_checkpoint_loads_with_weights_only_and_restores_the_model(tmp_path, small_text_file):
    run = tmp_path / "run"
    trainer = Trainer(spec(small_text_file, steps=4), run, quiet=True)
    trainer.run()
    state = ckpt.load(run / ckpt.CHECKPOINT_NAME)  # weights_only=True inside
    assert {"model", "optimizer", "step", "rng", "last_val_loss", "observers"} <= state.keys()
    assert state["step"] == 4 and math.isfinite(state["last_val_loss"])
    fresh = Trainer(spec(small_text_file, steps=4, seed=1), tmp_path / "other", quiet=True)
    fresh.model.load_state_dict(state["model"])
    restored, trained = fresh.model.state_dict(), trainer.model.state_dict()
    assert all(torch.equal(restored[k], trained[k]) for k in trained)
    config = json.loads((run / "config.json").read_text())
    assert RunSpec.from_dict(config) == trainer.spec


def test_save_atomic_replaces_the_file(tmp_path):
    path = tmp_path / "c.pt"
    ckpt.save_atomic({"x": torch.ones(2)}, path)
    ckpt.save_atomic({"x": torch.zeros(3)}, path)
    assert torch.equal(ckpt.load(path)["x"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


# --- (e) gradient accumulation ---------------------------------------------------------------------------


def test_grad_accumulation_matches_the_full_batch(tmp_path, small_text_file):
    # batch 8 in one micro-batch vs two micro-batches of 4: the mean loss over equal-size micro-batches
    # (each divided by grad_accum) is the full-batch mean, so gradients agree to float32 rounding.
    # Adam's first step is ≈ lr·sign(g) and so amplifies rounding for |g| ≈ 0; a larger ε (1e-6,
    # well above float noise in g) makes the update a smooth function of g for the update comparison.
    results = {}
    for accum in (1, 2):
        s = spec(small_text_file, steps=1, batch_size=8, grad_accum=accum, eval_every=1000)
        s = RunSpec(Parameterization(**{**s.param.to_dict(), "eps_base": 1e-6}), s.model, s.data, s.train)
        snap = Snapshot([0])
        Trainer(s, tmp_path / f"acc{accum}", observers=[snap], quiet=True).run()
        (loss,) = [m["loss"] for m in read_metrics(tmp_path / f"acc{accum}") if "loss" in m]
        results[accum] = (snap, loss)
    (s1, l1), (s2, l2) = results[1], results[2]
    assert l1 == pytest.approx(l2, rel=1e-6)
    assert s1.before[0].keys() == s2.before[0].keys()
    for k in s1.before[0]:
        assert torch.equal(s1.before[0][k], s2.before[0][k])  # same init
        scale = s1.grads[0][k].abs().max().item()
        torch.testing.assert_close(s2.grads[0][k], s1.grads[0][k], rtol=1e-4, atol=1e-5 * scale + 1e-12)
        u1 = s1.after[0][k] - s1.before[0][k]
        u2 = s2.after[0][k] - s2.before[0][k]
        lr = 2**-8  # one step: round(0.1 · 1) = 0 warmup steps, so the factor is 1
        torch.testing.assert_close(u2, u1, rtol=1e-3, atol=1e-3 * max(lr, u1.abs().max().item()))
    # The update is not empty.
    assert any((s1.after[0][k] != s1.before[0][k]).any() for k in s1.before[0])


# --- (f) learning-rate schedule -------------------------------------------------------------------------


def test_lr_factor_warmup_then_linear_to_near_zero():
    # total 10, warmup 2: warmup (s+1)/2; then 1 − (s−2)/8, which leaves 1/8 at the last step (s = 9).
    got = [lr_factor(s, 10, 2, "linear") for s in range(10)]
    want = [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    assert got == pytest.approx(want, abs=1e-15)
    assert lr_factor(10, 10, 2, "linear") == 0.0  # past the end: clamped to the floor


def test_lr_factor_cosine_and_floor():
    # progress p = (s − 2)/8; factor 0.5·(1 + cos πp).
    want = {2: 1.0, 4: 0.5 * (1 + math.cos(math.pi / 4)), 6: 0.5, 8: 0.5 * (1 + math.cos(3 * math.pi / 4))}
    for s, w in want.items():
        assert lr_factor(s, 10, 2, "cosine") == pytest.approx(w, abs=1e-15)
    # min_factor: floor + (1 − floor)·shape.
    assert lr_factor(6, 10, 2, "cosine", min_factor=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(6, 10, 2, "linear", min_factor=0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_factor(0, 10, 2, "cosine", min_factor=0.2) == 0.5  # warmup is not floored


def test_lr_factor_constant_and_no_warmup():
    assert [lr_factor(s, 5, 2, "constant") for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert [lr_factor(s, 4, 0, "linear") for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_logged_lr_follows_the_schedule(tmp_path, small_text_file):
    s = spec(small_text_file, steps=10, warmup_frac=0.2, schedule="linear", log_every=5, eval_every=1000,
             checkpoint_every=1000)
    trainer = Trainer(s, tmp_path / "run", quiet=True)
    trainer.run()
    lrs = [m["lr"] for m in read_metrics(tmp_path / "run") if "loss" in m]
    want = [2**-8 * f for f in (0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125)]
    assert lrs == pytest.approx(want, rel=1e-12)
    # Every group runs at its own peak times the same factor (last step: 1/8).
    for g in trainer.optimizer.param_groups:
        assert g["lr"] == pytest.approx(g["lr_peak"] * 0.125, rel=1e-12)


def test_validation_set_does_not_depend_on_batch_layout(tmp_path, small_text_file):
    # Same seed, so the same initial model: its validation loss must not depend on how the training
    # batch is split. Otherwise val losses of a batch-size or accumulation sweep are not comparable.
    losses = []
    for batch_size, accum in ((8, 1), (8, 2), (4, 1)):
        t = Trainer(spec(small_text_file, batch_size=batch_size, grad_accum=accum), tmp_path / f"b{batch_size}a{accum}",
                    quiet=True)
        losses.append(t.validate())
    assert losses[0] == losses[1] == losses[2], losses


def test_grad_clip_off_logs_the_true_norm(tmp_path, small_text_file):
    # grad_clip = 0 disables clipping; with a clip far above the norm the run is the same, and both log
    # the unclipped global gradient norm.
    rows = {}
    for clip in (0.0, 1e9):
        run = tmp_path / f"clip{clip}"
        Trainer(spec(small_text_file, steps=3, grad_clip=clip, eval_every=1000, checkpoint_every=1000), run,
                quiet=True).run()
        rows[clip] = [m for m in read_metrics(run) if "loss" in m]
    for a, b in zip(rows[0.0], rows[1e9]):
        assert a["loss"] == b["loss"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["grad_norm"] > 0


# --- configuration checks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "needle"),
    [({"steps": 0}, "steps=0"), ({"batch_size": 6, "grad_accum": 4}, "batch_size=6"),
     ({"schedule": "step"}, "'step'"), ({"warmup_frac": 1.0}, "warmup_frac=1.0"), ({"dtype": "fp8"}, "'fp8'"),
     ({"device": "tpu"}, "'tpu'"), ({"log_every": -1}, "log_every=-1")],
)
def test_validate_train(kw, needle):
    with pytest.raises(ConfigError) as err:
        validate_train(TrainConfig(**kw))
    assert needle in str(err.value)
