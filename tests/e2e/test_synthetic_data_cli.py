"""The synthetic data through `python run.py`; what the generator makes: unit/test_synthetic_data.py."""

import os
import subprocess
import sys
from pathlib import Path


def test_module_does_not_import_torch():
    root = Path(__file__).resolve().parents[2]
    code = "import sys, firstsight.data.synthetic; assert 'torch' not in sys.modules, 'torch imported'"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)
