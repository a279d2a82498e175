"""An always-on loss-spike detector over the per-step training loss and gradient norm.

Rule (robust z-score over a trailing window, on a log scale, upward only): for each signal x_t
(training loss, global gradient norm before clipping),

    z_t = (log x_t − median(log x_{t−W..t−1})) / max(1.4826 · MAD(log x_{t−W..t−1}), MIN_SCALE)

and step t is a spike when z_t > threshold for either signal, once `min_history` earlier steps are
known. The median and the MAD (median absolute deviation; × 1.4826 it estimates a Gaussian σ)
ignore the spikes themselves, which is why they are used instead of a mean and a standard deviation.
The log scale makes the rule the same for a loss of 5 and of 0.5; MIN_SCALE (a 1% change) keeps a
flat stretch of the curve from turning a tiny wiggle into a large z.

The detector runs on the host values that the trainer transfers once per `log_every` steps anyway
(no extra synchronisation), and its history is rebuilt from metrics.jsonl on resume, so a resumed
run marks the same steps. Torch-free on purpose.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

SIGNALS = ("loss", "grad_norm")
MIN_SCALE = 0.01  # smallest robust σ of log x: a 1% change


@dataclass(frozen=True)
class SpikeRule:
    window: int = 50  # trailing steps the median and MAD are taken over
    min_history: int = 10  # steps needed before anything can be called a spike
    threshold: float = 6.0  # robust z above which a step is a spike


class SpikeDetector:
    """Feeds on (step, loss, grad_norm); says which signals spiked at each step."""

    def __init__(self, rule: SpikeRule | None = None):
        self.rule = rule or SpikeRule()
        self.history: dict[str, deque[float]] = {s: deque(maxlen=self.rule.window) for s in SIGNALS}

    def zscore(self, signal: str, value: float) -> float:
        """Robust z of `value` against the trailing window of `signal` (NaN without enough history)."""
        past = self.history[signal]
        if len(past) < self.rule.min_history or not (value > 0 and math.isfinite(value)):
            return math.nan
        median = statistics.median(past)
        mad = statistics.median(abs(v - median) for v in past)
        return (math.log(value) - median) / max(1.4826 * mad, MIN_SCALE)

    def observe(self, values: dict[str, float]) -> dict[str, float]:
        """Signals that spiked at this step → their z (empty when none); then add the step to the history."""
        spikes = {}
        for signal in SIGNALS:
            value = values.get(signal)
            if value is None:
                continue
            z = self.zscore(signal, value)
            if z > self.rule.threshold:
                spikes[signal] = z
            if value > 0 and math.isfinite(value):
                self.history[signal].append(math.log(value))
        return spikes
