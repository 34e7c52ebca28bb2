"""What MLflow's system-metrics logging (tracking.system_metrics) costs a job, to choose its interval.

Two measurements, on the machine it runs on (CPU or GPU):

- per sample: the work MLflow's monitor thread does for each sample (mlflow.system_metrics:
  collect CPU, memory, disk, network and GPU figures, read the run back to see whether it is still
  running, log the sample with log_batch), timed --samples times on a SQLite store holding a run
  with the default config's params, as wall time and as the thread's CPU time. The cost to a job
  sampled every I seconds is about (time per sample) / I of its time, whatever the step time;
- in jobs: the default distill job (`python run.py`, --steps steps, no evaluation, no checkpoint)
  with system metrics on (every --interval s) and off, interleaved over --rounds rounds. A job's
  step times drift with the machine's load far more than 1 %, so jobs are not compared whole:
  within each job, the steps that overlap a sample are compared with their nearest steps that
  overlap none, and their excess time is the sample's cost. The same estimate on the jobs without
  system metrics, at made-up sample times, is its noise. Cost at interval I = net cost per sample / I.

    python benchmarks/system_metrics.py                # CPU: ~10 min on 2 busy cores
    python benchmarks/system_metrics.py --rounds 0     # the per-sample figure alone (~20 s)

Writes benchmarks/results/system_metrics_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from _common import RESULTS, results_path, run_job, run_meta, write_pair


def sample_cost(samples: int) -> Dict[str, Any]:
    """The monitor's work per sample (as SystemMetricsMonitor.monitor does it), timed in this thread."""
    from mlflow.entities import Metric, Param
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from mlflow.tracking import MlflowClient

    from firstsight.config.composition import CONFIG_NAME
    from firstsight.tracking.tracker import flatten_config, get_or_create_experiment

    cfg = _compose_default(CONFIG_NAME)
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        client = MlflowClient(uri)
        run = client.create_run(get_or_create_experiment(client, "system-metrics-cost"))
        run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in sorted(flatten_config(cfg).items())]
        for start in range(0, len(params), 100):
            client.log_batch(run_id, params=params[start : start + 100])
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"train/m{i}", 1.0, now, s) for i in range(20) for s in range(40)])
        monitor = SystemMetricsMonitor(run_id, sampling_interval=1, tracking_uri=uri)
        monitor.collect_metrics()  # psutil's first cpu_percent() primes its counters
        for m in monitor.monitors:
            m.clear_metrics()
        wall: List[float] = []
        cpu: List[float] = []
        for _ in range(samples):
            w0, c0 = time.perf_counter(), time.thread_time()
            monitor.collect_metrics()
            status = MlflowClient(uri).get_run(run_id).info.status  # the monitor's "still running?" check
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()  # one log_batch per sample, as with samples_before_logging=1
            cpu.append(time.thread_time() - c0)
            wall.append(time.perf_counter() - w0)
            assert status == "RUNNING"
        logged = sorted(k for k in client.get_run(run_id).data.metrics if k.startswith("system/"))
    return {
        "samples": samples,
        "params": len(params),
        "wall_ms_median": 1000 * statistics.median(wall),
        "wall_ms_mean": 1000 * statistics.fmean(wall),
        "cpu_ms_median": 1000 * statistics.median(cpu),
        "cpu_ms_mean": 1000 * statistics.fmean(cpu),
        "metrics_logged": logged,
    }


def _compose_default(config_name: str) -> Any:
    from hydra import compose, initialize_config_dir

    from firstsight.config.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return compose(config_name=config_name)


def step_windows(client: Any, run_id: str, warmup: int) -> List[Tuple[float, float]]:
    """(start, end) in seconds since the epoch of each optimizer step of a run, the warm-up left out:
    perf/step_time_s is logged when the step ends, with that time as its timestamp."""
    history = sorted(client.get_metric_history(run_id, "perf/step_time_s"), key=lambda m: m.step)
    return [(m.timestamp / 1000 - m.value, m.timestamp / 1000) for m in history][warmup:]


def sample_times(client: Any, run_id: str) -> List[float]:
    """When MLflow's monitor logged each sample (its metrics' timestamp, taken as the sample is
    recorded, between reading the run back and logging it)."""
    return sorted(m.timestamp / 1000 for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage"))


def excess_per_sample(steps: List[Tuple[float, float]], samples: List[float], window: float) -> List[float]:
    """For each sample: the time the steps it overlapped (within `window` s of it) took beyond the
    median of their 10 nearest steps that overlapped no sample. The overlap's cost, per sample."""

    def hit(step: Tuple[float, float], t: float) -> bool:
        return step[0] - window <= t <= step[1] + window

    clean = [i for i, st in enumerate(steps) if not any(hit(st, t) for t in samples)]
    excess = []
    for t in samples:
        touched = [i for i, st in enumerate(steps) if hit(st, t)]
        if not touched or len(clean) < 10:
            continue
        near = sorted(clean, key=lambda i: abs(i - touched[0]))[:10]
        baseline = statistics.median(steps[i][1] - steps[i][0] for i in near)
        excess.append(sum(steps[i][1] - steps[i][0] - baseline for i in touched))
    return excess


def end_to_end(interval: float, rounds: int, steps: int, warmup: int, workdir: Path) -> Dict[str, Any]:
    """Distill jobs with system metrics on (every `interval` s) and off, interleaved; the cost of a
    sample as the excess time of the steps it overlapped. Off: the same estimate at made-up sample
    times every `interval` s (what the estimate reads where nothing was sampled: its noise)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri)
    found: Dict[str, Dict[str, List[float]]] = {"on": {"excess": [], "step": []}, "off": {"excess": [], "step": []}}
    for r in range(rounds):
        for setting in ("on", "off"):
            out = workdir / f"r{r}-{setting}"
            overrides = [
                f"train.max_steps={steps}",
                f"train.throughput_warmup_steps={warmup}",
                "train.eval_at_end=false",
                "train.save_checkpoint=false",
                "train.progress_bar=false",
                f"train.log_every_n_steps={steps}",  # the job's own metric flushes stay out of the steps
                f"tracking.tracking_uri={uri}",
                f"tracking.run_name=r{r}-{setting}",
                f"tracking.system_metrics={'true' if setting == 'on' else 'false'}",
                f"tracking.system_metrics_interval_s={interval}",
            ]
            point = run_job(overrides, out, timeout=1800)
            if "error" in point:
                raise SystemExit(f"{setting}: {point['error']}")
            [run] = client.search_runs(
                [client.get_experiment_by_name("firstsight").experiment_id],
                filter_string=f"attributes.run_name = 'r{r}-{setting}'",
            )
            windows = step_windows(client, run.info.run_id, warmup)
            if setting == "on":
                times = sample_times(client, run.info.run_id)
            else:
                times = [
                    windows[0][0] + interval * (k + 1) for k in range(int((windows[-1][1] - windows[0][0]) / interval))
                ]
            excess = excess_per_sample(windows, times, SAMPLE_WINDOW_S)
            found[setting]["excess"] += excess
            found[setting]["step"].append(statistics.median(e - s for s, e in windows))
            print(
                f"round {r + 1}/{rounds} {setting}: {len(windows)} steps, median {found[setting]['step'][-1]:.4f} s; "
                f"{len(excess)} samples, mean excess {1000 * statistics.fmean(excess):.1f} ms",
                flush=True,
            )
    summary: Dict[str, Any] = {"interval_s": interval, "steps": steps, "rounds": rounds, "window_s": SAMPLE_WINDOW_S}
    for setting, f in found.items():
        n = len(f["excess"])
        mean = statistics.fmean(f["excess"])
        stderr = statistics.stdev(f["excess"]) / n**0.5 if n > 1 else float("nan")
        summary[setting] = {
            "samples": n,
            "excess_ms_mean": 1000 * mean,
            "excess_ms_stderr": 1000 * stderr,
            "excess_ms_median": 1000 * statistics.median(f["excess"]),
            "median_step_s_per_job": f["step"],
            "excess_ms_each": [1000 * e for e in f["excess"]],
        }
    return summary


SAMPLE_WINDOW_S = 0.1  # a step within this of a sample's time counts as overlapping it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200, help="samples timed for the per-sample cost")
    parser.add_argument("--interval", type=float, default=2.0, help="the jobs' sampling interval (s)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (on, off) jobs; 0: no jobs")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu_{os.cpu_count()}_cores"
    per_sample = sample_cost(args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        jobs = end_to_end(args.interval, args.rounds, args.steps, args.warmup_steps, Path(tmp)) if args.rounds else {}
    meta = run_meta(device, samples=args.samples, rounds=args.rounds, steps=args.steps, interval_s=args.interval)
    work = per_sample["wall_ms_median"] / 1000
    lines = [
        f"# MLflow system metrics: cost — {device}",
        "",
        f"{meta['date']}; {meta['command']}; mlflow {meta['versions']['mlflow']}",
        "",
        f"Per sample, the monitor's work alone ({per_sample['samples']} samples; SQLite store, a run with "
        f"{per_sample['params']} params): wall {per_sample['wall_ms_median']:.1f} ms median "
        f"({per_sample['wall_ms_mean']:.1f} mean), thread CPU {per_sample['cpu_ms_median']:.1f} ms median; "
        f"{len(per_sample['metrics_logged'])} metrics per sample.",
    ]
    net = None
    if jobs:
        on, off = jobs["on"], jobs["off"]
        net = (on["excess_ms_mean"] - off["excess_ms_mean"]) / 1000
        steps = ", ".join(f"{t:.3f}" for t in on["median_step_s_per_job"] + off["median_step_s_per_job"])
        lines += [
            "",
            f"In jobs: `python run.py` (the default tiny pair on the CPU), {args.steps} steps, {args.rounds} rounds of "
            f"(on every {args.interval:g} s, off) interleaved; median step of each job (on, then off): {steps} s. "
            f"Time the steps overlapping a sample (within {jobs['window_s']:g} s) took beyond their 10 nearest "
            "clean steps' median; off: the same at made-up times every interval (the estimate's noise):",
            "",
            "| system metrics | samples | excess per sample, mean ± s.e. (ms) | median (ms) |",
            "| --- | --- | --- | --- |",
            f"| on | {on['samples']} | {on['excess_ms_mean']:.1f} ± {on['excess_ms_stderr']:.1f} | "
            f"{on['excess_ms_median']:.1f} |",
            f"| off (no sample) | {off['samples']} | {off['excess_ms_mean']:.1f} ± {off['excess_ms_stderr']:.1f} | "
            f"{off['excess_ms_median']:.1f} |",
            "",
            f"Net cost per sample (on − off): {1000 * net:.1f} ms.",
        ]
    lines += [
        "",
        "| interval (s) | the monitor's work / interval | net cost in jobs / interval |",
        "| --- | --- | --- |",
    ]
    for interval in (1, 2, 5, 10, 30):
        measured = f"{100 * net / interval:.3f} %" if net is not None else "—"
        lines.append(f"| {interval} | {100 * work / interval:.3f} % | {measured} |")
    table = "\n".join(lines) + "\n"
    write_pair(
        results_path(args.results_dir, "system_metrics", device),
        {"meta": meta, "per_sample": per_sample, "jobs": jobs},
        table,
    )
    print(table)


if __name__ == "__main__":
    main()
