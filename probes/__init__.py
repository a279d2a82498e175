"""Probes: per-layer measurements of feature learning, recorded into xarray during training.

Kept import-light on purpose: `probes.schema` is shared with the torch-free `analyses` package, so
importing `probes` must not import torch. Import the torch parts from their modules
(`probes.recorder`, `probes.linearization`, ...).
"""
