"""The sweep benchmark: the greedy-schedule simulation, and (slow) the whole part end to end on tiny sweeps."""

import dataclasses
import math

import pytest

from benchmarks.sweep import QUICK_SWEEP, format_sweep, makespan, run_sweep_bench


def test_makespan_of_greedy_schedules():
    # Grid order leaves the long run alone at the end; longest first lets the short ones fill in beside it.
    assert makespan([1, 1, 1, 1, 4], 2) == 6
    assert makespan([4, 1, 1, 1, 1], 2) == 4
    assert makespan([3, 3, 2, 2, 2], 2) == 7  # greedy, not optimal (6): what the pool does
    assert makespan([5], 3) == 5


@pytest.mark.slow
def test_sweep_part_reports_every_figure(tmp_path):
    cfg = dataclasses.replace(QUICK_SWEEP, runs=2, steps=5, balance_depths=(1, 2), report_runs=12)
    result = run_sweep_bench(cfg)
    for side in ("warm", "cold"):
        r = result[side]
        assert r["runs"] == 2 and r["own_s"] > 0 and r["wall_s"] > 0
        # wall × workers covers at least the runs' own time (each worker runs them one after another)
        assert r["wall_over_own"] > 0.9 and math.isclose(
            r["fixed_s_per_run"], (r["wall_s"] * cfg.workers - r["own_s"]) / 2)
    b = result["balance"]
    assert b["runs"] == 4 and b["simulated_longest_first_over_ideal"] <= b["simulated_grid_order_over_ideal"]
    assert result["report"]["runs"] == 12 and result["report"]["ours_wall_s"] > 0
    assert len(format_sweep(result)) == 5
