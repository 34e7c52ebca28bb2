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
  within each job, the steps at a sample are compared with their nearest other steps, less the
  same comparison halfway to the next sample, where the monitor sleeps (a time falls more often
  in a long step, and how long steps are varies with the load); trimmed means, so that load
  spikes fall out. Cost at interval I = cost per sample / I.

    python benchmarks/system_metrics.py                # CPU: ~10-30 min on 2 shared cores
    python benchmarks/system_metrics.py --rounds 0     # the per-sample figure alone (~20 s)
    python benchmarks/system_metrics.py --render results/system_metrics_cpu_2_cores.json  # analyse again

Writes benchmarks/results/system_metrics_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from _common import RESULTS, results_path, run_job, run_meta, write_pair

from firstsight.config.record import config_record

SAMPLE_WINDOW_S = 0.05  # a step within this of a sample's time counts as overlapping it
TRIM = 0.1  # share of the excesses left out at each end of the trimmed mean


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
        params = [Param(k, v[:6000]) for k, v in sorted(flatten_config(config_record(cfg)).items())]
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


def excess(steps: List[Tuple[float, float]], points: List[float], avoid: List[float]) -> List[Optional[float]]:
    """For each time in `points`: the time the steps within SAMPLE_WINDOW_S of it took beyond the
    median of their 10 nearest steps near neither `points` nor `avoid`; None where no step was
    there (loading, evaluation)."""

    def hit(step: Tuple[float, float], t: float) -> bool:
        return step[0] - SAMPLE_WINDOW_S <= t <= step[1] + SAMPLE_WINDOW_S

    marks = points + avoid
    clean = [i for i, st in enumerate(steps) if not any(hit(st, t) for t in marks)]
    found: List[Optional[float]] = []
    for t in points:
        touched = [i for i, st in enumerate(steps) if hit(st, t)]
        if not touched or len(clean) < 10:
            found.append(None)
            continue
        near = sorted(clean, key=lambda i: abs(i - touched[0]))[:10]
        baseline = statistics.median(steps[i][1] - steps[i][0] for i in near)
        found.append(sum(steps[i][1] - steps[i][0] - baseline for i in touched))
    return found


def trimmed_mean(values: List[float], cut: float = TRIM) -> float:
    """The mean of `values` without their lowest and highest `cut` share."""
    ordered = sorted(values)
    k = int(len(ordered) * cut)
    return statistics.fmean(ordered[k : len(ordered) - k] or ordered)


def analyse(raw: List[Dict[str, Any]], interval: float) -> Dict[str, Any]:
    """A sample's cost in each job with system metrics: its steps' excess at each sample, paired
    with the excess at the point halfway to the next sample (where the monitor sleeps). The pairing
    takes out what a step's excess is without any sample: a time that falls in a step falls more
    often in a long one, and how long steps are varies with the machine's load. The jobs without
    system metrics give the same unpaired estimate at made-up times (about 0 on a steady machine)."""
    jobs = []
    for job in raw:
        steps, times = [tuple(w) for w in job["steps"]], job["samples"]
        durations = [e - s for s, e in steps]
        entry = {
            "round": job["round"],
            "setting": job["setting"],
            "steps": len(steps),
            "median_step_s": statistics.median(durations),
            "span_s": steps[-1][1] - steps[0][0],
            "slow_steps": sum(1 for d in durations if d > 5 * statistics.median(durations)),
        }
        if job["setting"] == "on":
            halfway = [t + interval / 2 for t in times]
            pairs = [
                (a, b)
                for a, b in zip(excess(steps, times, halfway), excess(steps, halfway, times))
                if None not in (a, b)
            ]
            diffs = [a - b for a, b in pairs]
            entry.update(
                samples=len(pairs),
                at_samples_ms=1000 * trimmed_mean([a for a, _ in pairs]),
                halfway_ms=1000 * trimmed_mean([b for _, b in pairs]),
                cost_ms=1000 * trimmed_mean(diffs),
                cost_ms_median=1000 * statistics.median(diffs),
                diffs_ms=[1000 * d for d in diffs],
            )
        else:
            made_up = [steps[0][0] + interval * (k + 1) for k in range(int(entry["span_s"] / interval))]
            values = [v for v in excess(steps, made_up, []) if v is not None]
            entry.update(samples=len(values), at_samples_ms=1000 * trimmed_mean(values))
        jobs.append(entry)
    # the jobs' costs pooled by the inverse of their variance: a job on a loaded machine counts little
    total = weighted = 0.0
    for j in jobs:
        if j["setting"] == "on" and j["samples"] > 2:
            k = int(len(j["diffs_ms"]) * TRIM)
            kept = sorted(j["diffs_ms"])[k : len(j["diffs_ms"]) - k]
            j["cost_ms_stderr"] = statistics.stdev(kept) / len(kept) ** 0.5
            weight = 1 / max(j["cost_ms_stderr"], 1e-6) ** 2
            total += weight
            weighted += weight * j["cost_ms"]
    return {
        "jobs": jobs,
        "cost_ms": weighted / total if total else None,
        "cost_ms_stderr": total**-0.5 if total else None,
    }


def run_jobs(interval: float, rounds: int, steps: int, warmup: int, workdir: Path) -> List[Dict[str, Any]]:
    """Distill jobs with system metrics on (every `interval` s) and off, interleaved: each job's
    step windows (and, on, its sample times)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri)
    raw: List[Dict[str, Any]] = []
    for r in range(rounds):
        for setting in ("on", "off"):
            name = f"r{r}-{setting}"
            overrides = [
                f"train.max_steps={steps}",
                f"train.throughput_warmup_steps={warmup}",
                "train.eval_at_end=false",
                "train.save_checkpoint=false",
                "train.progress_bar=false",
                f"train.log_every_n_steps={steps}",  # the job's own metric flushes stay out of the steps
                f"tracking.tracking_uri={uri}",
                f"tracking.run_name={name}",
                f"tracking.system_metrics={'true' if setting == 'on' else 'false'}",
                f"tracking.system_metrics_interval_s={interval}",
            ]
            point = run_job(overrides, workdir / name, timeout=3600)
            if "error" in point:
                raise SystemExit(f"{name}: {point['error']}")
            [run] = client.search_runs(
                [client.get_experiment_by_name("firstsight").experiment_id],
                filter_string=f"attributes.run_name = '{name}'",
            )
            windows = step_windows(client, run.info.run_id, warmup)
            times = sample_times(client, run.info.run_id) if setting == "on" else []
            raw.append({"round": r, "setting": setting, "steps": windows, "samples": times})
            print(
                f"{name}: {len(windows)} steps in {windows[-1][1] - windows[0][0]:.0f} s, {len(times)} samples",
                flush=True,
            )
    return raw


def render(data: Dict[str, Any]) -> str:
    meta, per_sample = data["meta"], data["per_sample"]
    work = per_sample["wall_ms_median"] / 1000
    lines = [
        f"# MLflow system metrics: cost — {meta['device']}",
        "",
        f"{meta['date']}; {meta['command']}; mlflow {meta['versions']['mlflow']}",
        "",
        f"Per sample, the monitor's work alone ({per_sample['samples']} samples; SQLite store, a run with "
        f"{per_sample['params']} params): wall {per_sample['wall_ms_median']:.1f} ms median "
        f"({per_sample['wall_ms_mean']:.1f} mean), thread CPU {per_sample['cpu_ms_median']:.1f} ms median; "
        f"{len(per_sample['metrics_logged'])} metrics per sample.",
    ]
    found = analyse(data["raw"], meta["interval_s"]) if data.get("raw") else None
    if found:
        lines += [
            "",
            f"In jobs: `python run.py` (the default tiny pair on the CPU), {meta['steps']} steps, {meta['rounds']} "
            f"round(s) of (system metrics on every {meta['interval_s']:g} s, off), interleaved. At each sample, the "
            f"time the steps within {SAMPLE_WINDOW_S:g} s of it took beyond their 10 nearest other steps' median, "
            "less the same halfway to the next sample (paired; "
            f"{int(100 * TRIM)} % trimmed means). Off: the unpaired estimate at made-up times (its noise):",
            "",
            "| job | steps | median step (s) | steps > 5x median | samples | at samples (ms) | halfway (ms) "
            "| cost per sample ± s.e. (ms) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for j in found["jobs"]:
            cost = f"{j['cost_ms']:.1f} ± {j['cost_ms_stderr']:.1f}" if "cost_ms_stderr" in j else "—"
            halfway = f"{j['halfway_ms']:.1f}" if j["setting"] == "on" else "—"
            lines.append(
                f"| round {j['round'] + 1}, {j['setting']} | {j['steps']} | {j['median_step_s']:.4f} | {j['slow_steps']} "
                f"| {j['samples']} | {j['at_samples_ms']:.1f} | {halfway} | {cost} |"
            )
        lines += [
            "",
            "The jobs' costs pooled, weighted by the inverse of their variance (a job on a loaded machine counts "
            f"little): {found['cost_ms']:.1f} ± {found['cost_ms_stderr']:.1f} ms per sample.",
        ]
    net = found["cost_ms"] / 1000 if found and found["cost_ms"] is not None else None
    lines += [
        "",
        "| interval (s) | the monitor's work / interval | cost in jobs / interval |",
        "| --- | --- | --- |",
    ]
    for interval in (1, 2, 5, 10, 30):
        measured = f"{100 * net / interval:.3f} %" if net is not None else "—"
        lines.append(f"| {interval} | {100 * work / interval:.3f} % | {measured} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200, help="samples timed for the per-sample cost")
    parser.add_argument("--interval", type=float, default=2.0, help="the jobs' sampling interval (s)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (on, off) jobs; 0: no jobs")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--render", help="an earlier results JSON: analyse its jobs again and rewrite its table")
    args = parser.parse_args()
    if args.render:
        path = Path(args.render)
        data = json.loads(path.read_text())
        write_pair(path, data, render(data))
        print(render(data))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu_{os.cpu_count()}_cores"
    per_sample = sample_cost(args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        raw = run_jobs(args.interval, args.rounds, args.steps, args.warmup_steps, Path(tmp)) if args.rounds else []
    meta = run_meta(device, samples=args.samples, rounds=args.rounds, steps=args.steps, interval_s=args.interval)
    data = {"meta": meta, "per_sample": per_sample, "raw": raw}
    table = render(data)
    write_pair(results_path(args.results_dir, "system_metrics", device), data, table)
    print(table)


if __name__ == "__main__":
    main()
