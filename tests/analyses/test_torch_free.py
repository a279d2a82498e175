"""`analyses` must run where torch is absent: import every module and draw a figure with torch blocked."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import analyses

REPO = Path(__file__).resolve().parents[2]

# A meta-path finder that refuses torch (and the packages that may import it), installed before
# anything else is imported, so an indirect `import torch` anywhere fails loudly.
SCRIPT = """
import importlib, io, sys

BLOCKED = ("torch", "trainer", "diagnose")

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked import of {name}")
        return None

sys.meta_path.insert(0, Block())
for name in MODULES:
    importlib.import_module(name)

import pandas as pd
from analyses import figures
table = pd.DataFrame({"param": ["alpha=1"] * 4, "alpha": [1.0] * 4, "depth": [2, 4, 2, 4], "width": [64] * 4,
                      "lr": [1e-3] * 4, "step": [0, 0, 1, 1], "component": [""] * 4,
                      "mean": [1.0, 0.7, 1.0, 1.0], "sem": [0.1] * 4, "n_seeds": [3] * 4})
buf = io.BytesIO()
figures.depth_coord_check_figure(table).savefig(buf, format="png")
assert buf.getvalue().startswith(b"\\x89PNG")
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
print("ok")
"""


def test_every_analyses_module_imports_without_torch():
    modules = ["analyses"] + [f"analyses.{m.name}" for m in pkgutil.iter_modules(analyses.__path__)]
    assert {"analyses.load", "analyses.laziness", "analyses.report", "analyses.figures"} <= set(modules)
    code = f"MODULES = {modules!r}\n" + SCRIPT
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
