"""FirstSight's submitit launchers: hydra-submitit-launcher's, waiting for every sweep point and
reporting each failed one (its overrides, why, its logs) instead of stopping at the first.

Hydra instantiates launchers only from the `hydra_plugins` namespace, so the classes live here; the
work is in firstsight/suite/launcher.py. Hydra imports this module whenever it scans for plugins (every
`python run.py`), and every job unpickles its launcher from it: keep it this small.
"""

from typing import Sequence

from hydra_plugins.hydra_submitit_launcher import submitit_launcher


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):  # type: ignore[override]
        from firstsight.suite.launcher import launch

        return launch(self, job_overrides, initial_job_idx)
