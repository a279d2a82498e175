"""benchmarks.probe_parts: ops are counted under the part that ran them; every part is timed and the
session is left as it was (no timed asserts)."""

import dataclasses

import torch

import probes.session
from benchmarks.probe_parts import PARTS, OpCounter, run
from benchmarks.suite import QUICK


def test_op_counter_counts_each_aten_op_under_its_part():
    counter = OpCounter()
    x = torch.ones(3)
    with counter:
        counter.part = "a"
        y = (x + 1) * 2
        counter.part = "b"
        y.sum()
    assert counter.counts["a"]["add"] == 1 and counter.counts["a"]["mul"] == 1
    assert counter.counts["b"] == {"sum": 1}


def test_every_part_is_timed_and_counted_and_the_session_restored():
    tiny = dataclasses.replace(QUICK, depth=1, seq_len=16, batch_size=2, probe_batch=2, warmup_steps=1)
    functions = (probes.session.builtin_statistics, probes.session.health_statistics)
    threads = torch.get_num_threads()
    out = run(tiny, steps=1)
    assert (probes.session.builtin_statistics, probes.session.health_statistics) == functions
    assert torch.get_num_threads() == threads
    for part in PARTS:
        assert out["parts_ms"][part] > 0 and out["ops"][part] > 0, part
    assert out["ops"]["probe_step"] > out["ops"]["plain_step"] + sum(out["ops"][p] for p in PARTS) - 1
