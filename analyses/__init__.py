"""Analyses of probe records: xarray in; numbers, verdicts and figures out. Imports no torch.

Modules (each usable from a notebook; the `diagnose` CLI calls the same functions):
- `load`: open a run dir (`open_run`) or many (`open_sweep`, over param/depth/width/seed/lr),
  read metrics and status; the errors every bad input ends in (`AnalysisError` and subclasses).
- `laziness`: slope of the linearization ratio vs depth, bootstrap interval, verdict.
- `coordcheck`: depth (paper Fig. 7) and width (µP) coordinate checks.
- `profile`: layer × step tables of feature updates and how evenly layers learn.
- `transfer`: optimal learning rate per depth and its drift.
- `figures`: one function per figure (seaborn/matplotlib, no pyplot state).
- `report`: `summarize`, `write_report` and `compare_runs`.

Submodules are not imported here, so `import analyses` stays cheap.
"""
