"""How long the command line takes before any work: `python run.py --cfg job` and `--help`.

Both compose the config and print; neither may import torch, transformers or mlflow (the
targets on a 2-core CPU machine: `--cfg job` <= 1.5 s, `--help` <= 1 s; the help lists every
group's choices, which firstsight.config.composition._fast_help makes cheap). Median and max over
--repeats runs each, plus whether a heavy package was imported (python -X importtime).

    python benchmarks/cli_startup.py            # CPU; ~20 s

Writes benchmarks/results/cli_startup_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from _common import RESULTS, ROOT, results_path, run_meta, write_pair  # noqa: E402

HEAVY = ("torch", "transformers", "mlflow")


def timed(args: list, repeats: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True, env=env)
        seconds.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit(f"run.py {' '.join(args)} failed: {result.stderr[-500:]}")
    trace = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "run.py"), *args], capture_output=True, text=True, env=env
    ).stderr
    imported = sorted({line.split("|")[-1].strip().split(".")[0] for line in trace.splitlines() if "|" in line})
    return {
        "args": args,
        "seconds": seconds,
        "median_s": statistics.median(seconds),
        "max_s": max(seconds),
        "heavy_imports": [name for name in HEAVY if name in imported],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args()
    points = [timed(["--cfg", "job"], args.repeats), timed(["--help"], args.repeats)]
    meta = run_meta("cpu", repeats=args.repeats)
    lines = [
        f"# Command-line start-up — {os.cpu_count()}-core CPU",
        "",
        f"{meta['date']}; {meta['command']}; python {meta['python']}",
        "",
        "| command | median (s) | max (s) | torch / transformers / mlflow imported |",
        "| --- | --- | --- | --- |",
    ]
    for p in points:
        lines.append(
            f"| `python run.py {' '.join(p['args'])}` | {p['median_s']:.2f} | {p['max_s']:.2f} | "
            f"{', '.join(p['heavy_imports']) or 'none'} |"
        )
    lines += ["", "Targets: `--cfg job` <= 1.5 s, `--help` <= 1 s."]
    table = "\n".join(lines) + "\n"
    write_pair(
        results_path(args.results_dir, "cli_startup", f"cpu_{os.cpu_count()}_cores"),
        {"meta": meta, "points": points},
        table,
    )
    print(table)


if __name__ == "__main__":
    main()
