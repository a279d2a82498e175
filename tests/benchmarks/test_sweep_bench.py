"""The sweep benchmark: the greedy-schedule simulation, and (slow) the whole part end to end on tiny sweeps."""

import dataclasses
import math

import pytest

from benchmarks.sweep import QUICK_SWEEP, format_sweep, makespan, run_sweep_bench, timeline_breakdown
from diagnose.sweep import write_timeline


def test_makespan_of_greedy_schedules():
    # Grid order leaves the long run alone at the end; longest first lets the short ones fill in beside it.
    assert makespan([1, 1, 1, 1, 4], 2) == 6
    assert makespan([4, 1, 1, 1, 1], 2) == 4
    assert makespan([3, 3, 2, 2, 2], 2) == 7  # greedy, not optimal (6): what the pool does
    assert makespan([5], 3) == 5


def test_timeline_breakdown_adds_up(tmp_path):
    # Two workers (pids 1, 2), three runs, written by the sweep's own writer; the command started at
    # unix 100 (launched 0.5 s before) and exited at 100 + 12.
    def run(worker, sent, received, built, start, end, closed, collected):
        return worker, sent, dict(received=received, built=built, loop_start=start, loop_end=end, validated=end + 0.1,
                                  saved=closed, closed=closed), collected

    runs = [run(1, 2.0, 2.0, 2.5, 2.6, 6.6, 7.0, 7.1), run(2, 2.0, 2.1, 2.6, 2.7, 9.7, 10.0, 10.1),
            run(1, 7.1, 7.2, 7.3, 7.4, 10.4, 10.6, 10.7)]
    events = [{"event": "started", "worker": w, "t": 100 + 1.5} for w in (1, 2)]
    for job, (worker, sent, _, collected) in enumerate(runs):
        events += [{"event": "sent", "worker": worker, "job": job, "t": 100 + sent},
                   {"event": "received", "worker": worker, "job": job, "t": 100 + runs[job][2]["received"]},
                   {"event": "collected", "worker": worker, "job": job, "t": 100 + collected}]
    phases = {job: {k: 100 + v for k, v in r[2].items()} for job, r in enumerate(runs)}
    write_timeline(tmp_path / "t.jsonl", 100.0, events, phases, ["a", "b", "c"])
    t = timeline_breakdown(tmp_path / "t.jsonl", launched=99.5, exited=112.0)["timeline"]
    assert t["own_s"] == pytest.approx(4 + 7 + 3)
    assert t["start_s"] == pytest.approx((2.6 - -0.5) + (2.7 - -0.5))  # to each worker's first loop
    assert t["build_s_per_run"] == pytest.approx(0.2 / 3)  # the first runs' builds are in start
    assert t["tail_s_per_run"] == pytest.approx((0.4 + 0.3 + 0.2) / 3)
    assert t["handoff_s_per_run"] == pytest.approx((0.2 + 0.1 + 0.1) / 3)  # closed → next received, last → collected
    assert t["idle_s"] == pytest.approx(10.7 - 10.1) and t["exit_s"] == pytest.approx(2 * (12 - 10.7))
    assert t["unaccounted_s"] == pytest.approx(0, abs=1e-9)
    # The final validations (loop end → validated) are the runs' own work in round 2's definition.
    assert t["final_val_s"] == pytest.approx(3 * 0.1)
    assert t["final_val_by_run"] == pytest.approx({"a": 0.1, "b": 0.1, "c": 0.1})


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
    # The timeline's parts add up to wall × workers (own from the timeline = own from metrics.jsonl).
    t = result["warm"]["timeline"]
    warm = result["warm"]
    assert abs(t["unaccounted_s"]) < 0.05 and t["own_s"] == pytest.approx(warm["loop_s"], abs=0.05)
    # own counts the final validations too; the loop-only ratio is the earlier definition, reported beside it.
    assert warm["final_val_s"] == t["final_val_s"] > 0
    assert warm["own_s"] == pytest.approx(warm["loop_s"] + t["final_val_s"])
    assert warm["wall_over_loop"] > warm["wall_over_own"]
    assert t["start_s"] > 0 and t["tail_s_per_run"] > 0
    lines = format_sweep(result)
    assert len(lines) == 8 and lines[-1] == (
        f"  TARGETS: warm sweep wall × workers / Σ own = {result['warm']['wall_over_own']:.3f} (≤ 1.15); "
        f"balance wall / (Σ own / workers) = {b['wall_over_ideal']:.3f} (≤ 1.10); own without the final "
        f"validation: {result['warm']['wall_over_loop']:.3f}, {b['wall_over_ideal_loop']:.3f}")
