"""The proxy study: does distillation beat plain cross-entropy at a scale one GPU runs, and what
does quantizing the distilled student cost? Everything is done by the suite's own code, with
experiment=proxy_study (conf/experiment/proxy_study.yaml):

1. Pre-training (firstsight/models/pretrain.py, reached through firstsight.models.loading.load_model, cached under
   `cache_dir`): the tiny teacher and the student's weaker base, in two processes side by side.
   Each is checked by that pre-training on the preset's validation split (seed 0).
2. Per seed, one worker process (the seeds side by side: tiny models leave an H100 mostly idle):
   the distill task (firstsight.suite.dispatch.run_task) for CE only (distill_loss=none) and each KD loss,
   the teacher and the base given as the directories of step 1 and the student distilled on a
   small transfer set (`--transfer-size` samples of the seed's train split, data.train_size);
   then every model's per-question outcome on the seed's validation split (data.validation_size
   questions, collated once): teacher-forced exact match, the distill task's own end-of-run
   measure (firstsight.training.loop.answer_outcomes) -- the teacher, the base, each distilled student,
   and each KD student again at each of `--precisions` (precision=<choice>, loaded as the
   evaluate task loads a frozen model).
3. Statistics (firstsight/evaluation/stats.py): each run's accuracy with its Wilson interval; per loss the
   mean over seeds with a t interval over the seed accuracies; the best KD loss against CE on
   the same questions and seeds (paired bootstrap interval, McNemar's exact test), the share of
   CE's gap to the teacher it closes, and whether it closes at least half of it (the interval
   of mean(kd - (teacher + ce) / 2) per question above 0); each quantized student's drop against
   bf16 with its paired interval and `stats.at_most(drop, 0.01)` verdict.

    python benchmarks/proxy_study.py                 # GPU: the whole study (minutes on one H100)
    python benchmarks/proxy_study.py --smoke         # CPU, experiment=proxy_study_cpu: the plumbing
    python benchmarks/proxy_study.py --render benchmarks/results/proxy_study_<device>.json

Prints the tables and writes JSON (settings, device, versions, date, git commit, every run's
figures and every per-question outcome, packed as hex) + Markdown to
benchmarks/results/proxy_study_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from _common import RESULTS, ROOT, cuda_device, read_results, results_path, run_meta, write_pair

from firstsight.config.specs import model_spec

LOSSES = ("none", "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")
PRECISIONS = ("bf16", "int8", "nf4", "int8_weight_only")
BASELINE_PRECISION = "bf16"  # the quantized students' drops are taken against it
SEEDS = (1, 2, 3, 4, 5)  # not 0: the teacher and the base were pre-trained on seed 0's train split
TRANSFER_SIZE = 1000  # train samples of each seed the student is distilled on
CLOSE_SHARE = 0.5  # the target: the best KD loss closes at least this share of CE's gap to the teacher
MAX_DROP = 0.01  # the target: each quantized student within 1 point of bf16
ALPHA = 0.05  # significance level of the paired tests
SMOKE = dict(
    experiment="proxy_study_cpu",
    seeds=(1, 2),
    losses=("none", "forward_kl"),
    precisions=("bf16", "int8_weight_only"),
    transfer_size=32,
    jobs=1,
)


# ------------------------------------------------------------------------------- helpers


def compose(overrides: Sequence[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from firstsight.config.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def pack(outcomes: Sequence[bool]) -> str:
    """Per-question outcomes as hex (8 questions a byte, the first in the high bit)."""
    import numpy as np

    return np.packbits(np.asarray(outcomes, dtype=bool)).tobytes().hex()


def unpack(text: str, n: int) -> List[bool]:
    import numpy as np

    return [bool(x) for x in np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n]]


def git_commit() -> Optional[str]:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        return done.stdout.strip() or None if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Dict[str, float]:
    """Mean of `values` with Student's t interval (NaN bounds for fewer than two values)."""
    n = len(values)
    mean = sum(values) / n if n else math.nan
    if n < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": n}
    from scipy.stats import t

    half = t.ppf((1 + confidence) / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def estimate_dict(estimate: Any) -> Dict[str, float]:
    return {"value": estimate.value, "low": estimate.low, "high": estimate.high, "n": estimate.n}


# ------------------------------------------------------------------------------- workers


def worker_pretrain(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Phase 1 for one role: the suite's load_model, which pre-trains a tiny side on first use."""
    import torch

    from firstsight.core.files import read_info
    from firstsight.core.runtime import device_type
    from firstsight.models.loading import load_model, load_processor

    cfg = compose(spec["overrides"])
    if cfg.hardware.num_threads:
        torch.set_num_threads(cfg.hardware.num_threads)
    device = device_type(cfg.hardware)
    processor = load_processor(cfg.model, cfg.cache_dir)
    start = time.perf_counter()
    loaded = load_model(model_spec(cfg), spec["role"], processor, device, frozen=True)
    return {
        "role": spec["role"],
        "dir": loaded.origin,
        "params": loaded.params_b * 1e9,
        "seconds": time.perf_counter() - start,
        "info": read_info(Path(loaded.origin)),
    }


def distill_overrides(spec: Dict[str, Any], seed: int, loss: str) -> List[str]:
    alpha = [f"distill_loss.alpha={spec['kd_alpha']}"] if spec.get("kd_alpha") is not None and loss != "none" else []
    return [
        *spec["overrides"],
        f"seed={seed}",
        f"distill_loss={loss}",
        *alpha,
        f"model.teacher.source={spec['teacher_dir']}",
        "model.teacher.weights=pretrained",
        f"model.student.source={spec['student_dir']}",
        "model.student.weights=pretrained",
        f"data.train_size={spec['transfer_size']}",
        "train.eval_at_end=false",
        "train.save_checkpoint=true",
        "tracking.enabled=false",
        "train.progress_bar=false",
    ]


def run_distill(spec: Dict[str, Any], seed: int, loss: str) -> Dict[str, Any]:
    """One distill job in this process, in a directory of its own (its checkpoint lands there)."""
    from firstsight.suite.dispatch import run_task

    run_dir = Path(spec["work_dir"]) / f"seed{seed}" / loss
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = distill_overrides(spec, seed, loss)
    here = os.getcwd()
    os.chdir(run_dir)  # composed outside Hydra's run: the job writes into the working directory
    start = time.perf_counter()
    try:
        metrics = run_task(compose(overrides))
    except BaseException as err:  # noqa: BLE001 - a failed point is recorded; the others still run
        if isinstance(err, KeyboardInterrupt):
            raise
        return {"error": f"{type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}", "overrides": overrides}
    finally:
        os.chdir(here)
    keep = (
        "train/loss",
        "train/kd_loss",
        "train/ce_loss",
        "perf/throughput_samples_per_s",
        "model/params_b",
        "model/teacher_params_b",
    )
    return {
        "seconds": time.perf_counter() - start,
        "checkpoint": str(run_dir / "checkpoints" / "student"),
        "overrides": overrides,
        "metrics": {k: float(metrics[k]) for k in keep if k in metrics},
    }


class Validation:
    """A seed's validation split collated once (and kept on the device) with the M-RoPE positions
    of every batch computed once on the host (firstsight/models/positions.py: the values the model would
    compute itself), so that every model answers exactly the same batches and none repeats the
    per-row position loop; `outcomes_of` loads a checkpoint at a precision as the evaluate task
    loads a frozen model and returns its per-question teacher-forced exact match."""

    def __init__(self, spec: Dict[str, Any], seed: int):
        import torch

        from firstsight.core.runtime import device_type
        from firstsight.data import load_split
        from firstsight.data.batching import QACollator
        from firstsight.models.loading import load_processor

        self.spec, self.seed = spec, seed
        base = compose([*spec["overrides"], f"seed={seed}"])
        self.device = device_type(base.hardware)
        self.dataset = load_split(base.data, "validation", seed)
        self.processor = load_processor(
            base.model, base.cache_dir
        )  # the tiny processor the pre-trained models were saved with
        start = time.perf_counter()
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=spec["eval_batch_size"],
            shuffle=False,
            collate_fn=QACollator(self.processor),
            num_workers=spec["eval_workers"],
        )
        self.batches: List[Dict[str, Any]] = list(loader)
        self.positions_ready = False
        self.collate_s = time.perf_counter() - start

    def _add_positions(self, model: Any) -> None:
        from firstsight.models.positions import mrope_positions
        from firstsight.training.loop import to_device

        for i, batch in enumerate(self.batches):
            positions = mrope_positions(model, batch, on_host=True)
            batch = to_device(batch, self.device)
            if positions is not None:
                batch["position_ids"] = positions.to(self.device)
            self.batches[i] = batch
        self.positions_ready = True

    def outcomes_of(self, directory: str, precision: str) -> Dict[str, Any]:
        import torch

        from firstsight.core.runtime import torch_dtype
        from firstsight.models.loading import load_model
        from firstsight.training.loop import answer_outcomes

        cfg = compose(
            [
                *self.spec["overrides"],
                f"seed={self.seed}",
                f"precision={precision}",
                f"model.student.source={directory}",
                "model.student.weights=pretrained",
            ]
        )
        began = time.perf_counter()
        try:
            loaded = load_model(model_spec(cfg), "student", self.processor, self.device, frozen=True)
            if not self.positions_ready:
                self._add_positions(loaded.model)
            right = answer_outcomes(loaded.model, iter(self.batches), self.device, torch_dtype(cfg.precision.dtype))
        except Exception as err:  # noqa: BLE001 - recorded; the other models are still measured
            return {"error": f"{type(err).__name__}: {err}", "precision": precision}
        weights_gb = loaded.weights_gb
        del loaded
        if self.device == "cuda":
            torch.cuda.empty_cache()
        return {
            "precision": precision,
            "accuracy": sum(right) / len(right),
            "outcomes": pack(right),
            "weights_gb": weights_gb,
            "seconds": time.perf_counter() - began,
        }

    def summary(self) -> Dict[str, Any]:
        return {
            "seed": self.seed,
            "n": len(self.dataset),
            "chance": self.dataset.chance_accuracy(),
            "kinds": [self.dataset.kind_of(i) for i in range(len(self.dataset))],
            "collate_s": self.collate_s,
        }


def worker_seed(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Phase 2 for one seed: the validation batches, the teacher's and the base's outcomes, then per
    loss its distill run and the distilled student's outcomes (at `reference_precision`). The result
    so far is written after each step, so a worker stopped at the deadline still counts."""
    validation = Validation(spec, spec["seed"])
    result: Dict[str, Any] = {**validation.summary(), "runs": {}, "models": {}}

    def save() -> None:
        Path(spec["out"]).write_text(json.dumps(result))

    for key, directory in (("teacher", spec["teacher_dir"]), ("base", spec["student_dir"])):
        result["models"][key] = validation.outcomes_of(directory, spec["reference_precision"])
        save()
    for loss in spec["losses"]:
        run = result["runs"][loss] = run_distill(spec, spec["seed"], loss)
        if "error" not in run:
            result["models"][loss] = validation.outcomes_of(run["checkpoint"], spec["reference_precision"])
        save()
    return result


def worker_quantized(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Phase 3 for one seed: the chosen distilled student at each precision, on the same questions."""
    validation = Validation(spec, spec["seed"])
    result: Dict[str, Any] = {"seed": spec["seed"], "models": {}, "collate_s": validation.collate_s}
    for precision in spec["precisions"]:
        result["models"][f"{spec['loss']}@{precision}"] = validation.outcomes_of(spec["checkpoint"], precision)
        Path(spec["out"]).write_text(json.dumps(result))
    return result


def run_worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    workers = {"pretrain": worker_pretrain, "seed": worker_seed, "quantized": worker_quantized}
    result = workers[spec["phase"]](spec)
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


def launch(spec: Dict[str, Any], work: Path, name: str, timeout: Optional[float] = None) -> Dict[str, Any]:
    """Run a worker as its own process (its output in <work>/<name>.log); its result, or the end of
    its log as `error`. Stopped after `timeout` seconds, a worker's result so far is returned
    marked `stopped` (the seed workers write theirs after every step)."""
    spec = {**spec, "out": str(work / f"{name}.result.json")}
    spec_path, log_to = work / f"{name}.spec.json", work / f"{name}.log"
    spec_path.write_text(json.dumps(spec))
    start = time.perf_counter()
    stopped = False
    with open(log_to, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,
        )
        try:
            returncode = process.wait(timeout=None if timeout is None else max(1.0, timeout))
        except subprocess.TimeoutExpired:
            stopped = True
            os.killpg(process.pid, signal.SIGKILL)  # the worker and its data-loading processes
            returncode = process.wait()
    seconds = time.perf_counter() - start
    out = Path(spec["out"])
    if out.is_file() and (returncode == 0 or stopped):
        result = json.loads(out.read_text())
        result["process_s"] = seconds
        if stopped:
            result["stopped"] = f"stopped at the time budget after {seconds:.0f} s"
        return result
    return {"error": f"exit status {returncode}: " + log_to.read_text(errors="replace")[-3000:], "process_s": seconds}


# --------------------------------------------------------------------------- statistics


def best_kd_loss(seeds: List[Dict[str, Any]], losses: Sequence[str]) -> Optional[str]:
    """The KD loss whose students are the most accurate on average over the seeds that measured
    every loss (None when none did)."""

    def measured(s: Dict[str, Any], key: str) -> bool:
        return "outcomes" in s.get("models", {}).get(key, {})

    complete = [s for s in seeds if measured(s, "none")]
    kd = [loss for loss in losses if loss != "none" and complete and all(measured(s, loss) for s in complete)]
    if not kd:
        return None
    return max(kd, key=lambda loss: statistics.mean(s["models"][loss]["accuracy"] for s in complete))


def analyse(data: Dict[str, Any]) -> Dict[str, Any]:
    """The study's figures from the per-question outcomes in `data["seeds"]`."""
    from firstsight.evaluation import stats

    # the seeds that measured the teacher and CE only, and the losses all of those measured (a seed
    # stopped at the time budget may lack its last losses)
    def measured(s: Dict[str, Any], key: str) -> bool:
        return "outcomes" in s.get("models", {}).get(key, {})

    seeds = [s for s in data["seeds"] if measured(s, "teacher") and measured(s, "none")]
    if not seeds:
        return {"error": "no seed measured both the teacher and CE only"}
    losses = [loss for loss in data["losses"] if all(measured(s, loss) for s in seeds)]

    def outcomes(key: str) -> List[List[bool]]:
        return [unpack(s["models"][key]["outcomes"], s["n"]) for s in seeds]

    def pooled(key: str) -> List[bool]:
        return [x for per_seed in outcomes(key) for x in per_seed]

    def available(key: str) -> bool:
        return all(key in s["models"] and "outcomes" in s["models"][key] for s in seeds)

    accuracy: Dict[str, Any] = {}
    for key in ["teacher", "base", *losses]:
        if not available(key):
            continue
        per_seed = [estimate_dict(stats.proportion(o)) for o in outcomes(key)]
        accuracy[key] = {
            "per_seed": per_seed,
            "over_seeds": t_interval([e["value"] for e in per_seed]),
            "pooled": estimate_dict(stats.proportion(pooled(key))),
        }
    chance = sum(s["chance"] for s in seeds) / len(seeds)
    result: Dict[str, Any] = {
        "seeds": [s["seed"] for s in seeds],
        "questions_per_seed": seeds[0]["n"],
        "chance": chance,
        "accuracy": accuracy,
        "losses": losses,
        "seeds_left_out": [s.get("seed") for s in data["seeds"] if s not in seeds],
        "losses_left_out": [loss for loss in data["losses"] if loss not in losses],
    }
    if "none" not in losses or "teacher" not in accuracy:
        return result
    ce, teacher = pooled("none"), pooled("teacher")
    kd_losses = [loss for loss in losses if loss != "none"]
    comparisons = {}
    gap = stats.paired_difference(teacher, ce)
    for loss in kd_losses:
        kd = pooled(loss)
        gain = stats.paired_difference(kd, ce)
        # mean over questions of kd - (teacher + ce) / 2: above 0 exactly when KD closes more than
        # half of CE's gap to the teacher; its paired bootstrap interval decides "significantly"
        margin = stats.paired_difference(kd, [t * CLOSE_SHARE + c * (1 - CLOSE_SHARE) for t, c in zip(teacher, ce)])
        seed_gains = [
            a - b
            for a, b in zip([sum(o) / len(o) for o in outcomes(loss)], [sum(o) / len(o) for o in outcomes("none")])
        ]
        comparisons[loss] = {
            "gain": estimate_dict(gain),
            "gap": estimate_dict(gap),
            "closed_share": gain.value / gap.value if gap.value else math.nan,
            "half_gap_margin": estimate_dict(margin),
            "mcnemar_p": stats.mcnemar_p(kd, ce),
            "mcnemar_p_bonferroni": min(1.0, stats.mcnemar_p(kd, ce) * len(kd_losses)),
            "seed_gains": seed_gains,
            "seed_gain_interval": t_interval(seed_gains),
        }
    result["kd_vs_ce"] = comparisons
    if not comparisons:
        return result
    best = best_kd_loss(seeds, losses)
    c = comparisons[best]
    if c["gain"]["value"] > 0 and c["mcnemar_p"] < ALPHA and c["half_gap_margin"]["low"] > 0:
        verdict = "MET"
    elif c["half_gap_margin"]["high"] < 0 or c["gain"]["value"] <= 0:
        verdict = "MISSED"
    else:
        verdict = "unresolved"
    result["best_kd"] = {"loss": best, "verdict": verdict}
    quantized: Dict[str, Any] = {}
    # the seeds whose quantized evaluations all came through (paired on their questions)
    keys = [f"{best}@{precision}" for precision in data["precisions"]]
    measured = [s for s in seeds if all("outcomes" in s["models"].get(key, {}) for key in keys)]

    def pooled_over(key: str) -> List[bool]:
        return [x for s in measured for x in unpack(s["models"][key]["outcomes"], s["n"])]

    if measured and BASELINE_PRECISION in data["precisions"]:
        result["quantized_seeds"] = [s["seed"] for s in measured]
        reference = pooled_over(f"{best}@{BASELINE_PRECISION}")
        reference_estimate = stats.proportion(reference)
        for precision, key in zip(data["precisions"], keys):
            other = pooled_over(key)
            entry = {
                "accuracy": estimate_dict(stats.proportion(other)),
                "weights_gb": statistics.mean(s["models"][key]["weights_gb"] for s in measured),
            }
            if precision != BASELINE_PRECISION:
                drop = stats.paired_difference(reference, other)
                entry["drop"] = estimate_dict(drop)
                entry["mcnemar_p"] = stats.mcnemar_p(reference, other)
                entry["verdict"] = str(stats.at_most(drop, MAX_DROP, teacher=reference_estimate, chance=chance))
            quantized[precision] = entry
    result["quantized"] = quantized
    kinds = [k for s in seeds for k in s["kinds"]]
    by_kind: Dict[str, Dict[str, float]] = {}
    for key in ["teacher", "base", "none", best]:
        if available(key):
            right = pooled(key)
            for kind in dict.fromkeys(kinds):
                picked = [r for r, k in zip(right, kinds) if k == kind]
                by_kind.setdefault(kind, {})[key] = sum(picked) / len(picked)
    result["accuracy_by_kind"] = by_kind
    return result


# ------------------------------------------------------------------------------ report


def _pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def _est(e: Dict[str, float]) -> str:
    return f"{_pct(e['value'])} [{_pct(e['low'])}, {_pct(e['high'])}]"


def _signed(e: Dict[str, float]) -> str:
    return f"{100 * e['value']:+.1f} [{100 * e['low']:+.1f}, {100 * e['high']:+.1f}]"


def markdown(data: Dict[str, Any]) -> str:
    a = data["analysis"]
    device = data["device"]
    pre = data["pretrained"]
    lines = [
        f"# Proxy study: KD against CE-only, then the distilled student quantized — {device}",
        "",
        f"{data['date']}; git commit `{data.get('commit') or 'unknown'}`; `{data['command']}`; "
        f"versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + ".",
        "",
    ]
    if "error" in a:
        return "\n".join(lines + [f"No result: {a['error']}.", ""])
    teacher, student = pre.get("teacher", {}), pre.get("student", {})
    t_info, s_info = teacher.get("info", {}), student.get("info", {})
    ratio = student.get("params", math.nan) / teacher.get("params", math.nan) if teacher.get("params") else math.nan
    lines += [
        f"Preset `experiment={data['experiment']}` on {device}. Teacher: tiny Qwen2-VL, "
        f"{teacher.get('params', math.nan) / 1e6:.2f} M parameters, pre-trained {t_info.get('steps')} steps; "
        f"validation exact match at pre-training **{_pct(t_info.get('validation_accuracy', math.nan))} %** on "
        f"{t_info.get('validation_size')} questions of seed 0 (chance {_pct(t_info.get('chance_accuracy', math.nan))} %). "
        f"Student: {student.get('params', math.nan) / 1e6:.2f} M parameters ({ratio:.2f}x the teacher's), from a base "
        f"pre-trained {s_info.get('steps')} steps ({_pct(s_info.get('validation_accuracy', math.nan))} % at pre-training). "
        f"Each run distils the base for {data['settings']['max_steps']} steps x batch {data['settings']['batch_size']} "
        f"on a transfer set of {data['transfer_size']} train samples of its seed (lr {data['settings']['lr']}; "
        f"KD losses at T={data['settings']['temperature']}, alpha={data['settings']['alpha']}). Accuracy: "
        f"teacher-forced exact match on the {a['questions_per_seed']} validation questions of each seed "
        f"({', '.join(map(str, a['seeds']))}), chance {_pct(a['chance'])} %. Figures in %; [95 % intervals].",
        "",
        "## Accuracy per loss (fp32)",
        "",
        "| model | " + " | ".join(f"seed {s} (Wilson)" for s in a["seeds"]) + " | mean over seeds [t] | "
        "gain over CE, paired [bootstrap] | McNemar p |",
        "| --- | " + " | ".join("---" for _ in a["seeds"]) + " | --- | --- | --- |",
    ]
    for key in ["teacher", "base", *a["losses"]]:
        if key not in a["accuracy"]:
            continue
        acc = a["accuracy"][key]
        over = acc["over_seeds"]
        name = {"teacher": "teacher", "base": "student base (before distilling)", "none": "CE only (none)"}.get(
            key, key
        )
        comparison = a.get("kd_vs_ce", {}).get(key)
        gain = _signed(comparison["gain"]) if comparison else ""
        p = f"{comparison['mcnemar_p']:.2g}" if comparison else ""
        lines.append(
            f"| {name} | "
            + " | ".join(_est(e) for e in acc["per_seed"])
            + f" | {_pct(over['mean'])} [{_pct(over['low'])}, {_pct(over['high'])}] | {gain} | {p} |"
        )
    if "best_kd" in a:
        best = a["best_kd"]["loss"]
        c = a["kd_vs_ce"][best]
        lines += [
            "",
            f"## Best KD loss against CE only: {best}",
            "",
            "| CE's gap to the teacher | gain of KD over CE | share of the gap closed | "
            "mean(kd − (teacher + ce)/2) | McNemar p (x5 losses) | gain per seed, mean [t] | verdict |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| {_signed(c['gap'])} | {_signed(c['gain'])} | {_pct(c['closed_share'])} % | "
            f"{_signed(c['half_gap_margin'])} | {c['mcnemar_p']:.2g} ({c['mcnemar_p_bonferroni']:.2g}) | "
            f"{100 * c['seed_gain_interval']['mean']:+.1f} [{100 * c['seed_gain_interval']['low']:+.1f}, "
            f"{100 * c['seed_gain_interval']['high']:+.1f}] | **{a['best_kd']['verdict']}** |",
            "",
            f"Target: the best KD loss closes at least {CLOSE_SHARE:.0%} of CE's gap, significantly: MET when "
            f"the gain is positive with McNemar p < {ALPHA} and the interval of mean(kd − (teacher + ce)/2) lies "
            "above 0; MISSED when that interval lies below 0 (or no gain); else unresolved. Questions of all "
            "seeds pooled, paired by seed and question; the best loss is picked on these same runs.",
        ]
    if a.get("quantized"):
        best = a["best_kd"]["loss"]
        lines += [
            "",
            f"## The distilled student ({best}) quantized",
            "",
            f"Seeds {', '.join(map(str, a.get('quantized_seeds', [])))}, their questions pooled; the drop is "
            f"paired on the same questions.",
            "",
            f"| precision | accuracy | weights (GB) | drop vs {BASELINE_PRECISION}, paired | "
            f"McNemar p | verdict (drop ≤ {100 * MAX_DROP:g} point) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for precision, q in a["quantized"].items():
            drop = _signed(q["drop"]) if "drop" in q else "(the reference)"
            p = f"{q['mcnemar_p']:.2g}" if "mcnemar_p" in q else ""
            lines.append(
                f"| {precision} | {_est(q['accuracy'])} | {q['weights_gb']:.4f} | {drop} | {p} | "
                f"{q.get('verdict', '')} |"
            )
    if a.get("accuracy_by_kind"):
        keys = list(next(iter(a["accuracy_by_kind"].values())))
        lines += [
            "",
            "## Accuracy by question kind (all seeds' questions)",
            "",
            "| kind | " + " | ".join(keys) + " |",
            "| --- | " + " | ".join("---" for _ in keys) + " |",
        ]
        for kind, row in a["accuracy_by_kind"].items():
            lines.append(f"| {kind} | " + " | ".join(_pct(row.get(k, math.nan)) for k in keys) + " |")
    lines += [
        "",
        "## Time",
        "",
        f"Pre-training {data['timing']['pretrain_s']:.0f} s (teacher {teacher.get('seconds', math.nan):.0f} s, "
        f"base {student.get('seconds', math.nan):.0f} s, side by side; seconds when cached); the seeds' "
        f"distill runs and evaluations {data['timing']['seeds_s']:.0f} s side by side; the quantized "
        f"evaluations {data['timing'].get('quantized_s', 0):.0f} s; whole call {data['timing']['total_s']:.0f} s.",
    ]
    if a.get("seeds_left_out") or a.get("losses_left_out"):
        lines += [
            "",
            "Left out of the statistics (not measured on every seed, e.g. stopped at the time budget): "
            f"seeds {', '.join(map(str, a['seeds_left_out'])) or 'none'}; losses "
            f"{', '.join(a['losses_left_out']) or 'none'}.",
        ]
    failures = [f"seed {s.get('seed')}: {s['error'][-300:]}" for s in data["seeds"] if "error" in s]
    failures += [
        f"seed {s['seed']} {loss}: {run['error'][:300]}"
        for s in data["seeds"]
        if "runs" in s
        for loss, run in s["runs"].items()
        if "error" in run
    ]
    failures += [
        f"seed {s['seed']} {key}: {m['error'][:300]}"
        for s in data["seeds"]
        if "models" in s
        for key, m in s["models"].items()
        if "error" in m
    ]
    if failures:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------- main


def strip_outcomes(data: Dict[str, Any]) -> Dict[str, Any]:
    """`data` without the bulky per-question fields, for printing."""
    return {k: v for k, v in data.items() if k != "seeds"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, experiment=proxy_study_cpu, 2 seeds, 2 losses")
    parser.add_argument("--experiment", default="proxy_study")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    parser.add_argument(
        "--transfer-size",
        type=int,
        default=TRANSFER_SIZE,
        help="train samples of each seed the student is distilled on (data.train_size of the runs)",
    )
    parser.add_argument(
        "--kd-alpha", type=float, default=None, help="distill_loss.alpha of the KD runs (default: each loss's)"
    )
    parser.add_argument("--jobs", type=int, default=None, help="seeds' workers side by side (default: all seeds)")
    parser.add_argument(
        "--pretrain-workers",
        type=int,
        nargs=2,
        default=(10, 4),
        metavar=("TEACHER", "STUDENT"),
        help="data workers of the two pre-trainings (GPU; the CPU smoke uses none)",
    )
    parser.add_argument("--eval-batch-size", type=int, default=250)
    parser.add_argument("--eval-workers", type=int, default=3, help="processes collating each seed's validation split")
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="stop the seeds' workers so that the results are written within this many seconds "
        "(what they measured by then is kept; the quantized evaluations run only if time is left)",
    )
    parser.add_argument("--work-dir", default=None, help="runs and checkpoints (default: a temporary directory)")
    parser.add_argument("--models-tar", default=None, help="also pack the pre-trained teacher and base into this tar")
    parser.add_argument("--commit", default=None, help="the git commit of the tree (default: git rev-parse HEAD)")
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--render", metavar="JSON", help="re-render an earlier results file's tables and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="more run.py overrides for every job")
    args = parser.parse_args()
    if args.worker:
        return run_worker(args.worker)
    if args.render:
        meta, points = read_results(args.render)
        print(markdown({**meta, "seeds": points}))
        return 0
    if args.smoke:
        args.experiment, args.seeds, args.losses = SMOKE["experiment"], list(SMOKE["seeds"]), list(SMOKE["losses"])
        args.precisions, args.transfer_size, args.jobs = (
            list(SMOKE["precisions"]),
            SMOKE["transfer_size"],
            SMOKE["jobs"],
        )
        args.pretrain_workers, args.eval_workers = (0, 0), 0
        if args.results_dir == str(RESULTS):
            args.results_dir = tempfile.mkdtemp(prefix="proxy-study-smoke-")
        device = "cpu"
    else:
        device = cuda_device()
        if device == "cpu":
            print(
                "no CUDA GPU visible: the study is sized for a GPU (--smoke: the plumbing on this CPU)", file=sys.stderr
            )
            return 2
    if args.precisions and BASELINE_PRECISION not in args.precisions:
        args.precisions = [BASELINE_PRECISION, *args.precisions]
    overrides = [f"experiment={args.experiment}", *args.overrides]
    cfg = compose(overrides)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="proxy-study-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    # 1. the teacher and the student's base: pre-trained on first use (cached), side by side
    pretrained: Dict[str, Any] = {}

    def pretrain(role: str, workers: int) -> Dict[str, Any]:
        extra = [f"hardware.dataloader_workers={workers}"] if workers else []
        return launch({"phase": "pretrain", "role": role, "overrides": [*overrides, *extra]}, work, f"pretrain_{role}")

    def left(reserve: float) -> Optional[float]:
        """Seconds a phase may still take, keeping `reserve` for what follows; None: no budget."""
        return None if args.time_budget_s is None else args.time_budget_s - (time.perf_counter() - began) - reserve

    with ThreadPoolExecutor(2) as pool:
        futures = {
            role: pool.submit(pretrain, role, n) for role, n in zip(("teacher", "student"), args.pretrain_workers)
        }
        pretrained = {role: future.result() for role, future in futures.items()}
    pretrain_s = time.perf_counter() - began
    for role, result in pretrained.items():
        if "error" in result:
            print(f"pre-training the {role} failed:\n{result['error']}", file=sys.stderr)
            return 1
        info = result["info"]
        print(
            f"{role}: {result['params'] / 1e6:.2f} M parameters, validation accuracy "
            f"{info['validation_accuracy']:.4f} on {info['validation_size']} questions (chance "
            f"{info['chance_accuracy']:.4f}), {result['seconds']:.0f} s: {result['dir']}",
            flush=True,
        )
    if args.models_tar:
        with tarfile.open(args.models_tar, "w") as tar:
            for role, result in pretrained.items():
                tar.add(result["dir"], arcname=Path(result["dir"]).name)
        print(f"packed the pre-trained models into {args.models_tar}", flush=True)

    # 2. per seed: the distill runs and every model's per-question outcomes
    spec = {
        "phase": "seed",
        "overrides": overrides,
        "losses": args.losses,
        "teacher_dir": pretrained["teacher"]["dir"],
        "student_dir": pretrained["student"]["dir"],
        "transfer_size": args.transfer_size,
        "kd_alpha": args.kd_alpha,
        "work_dir": str(work),
        "eval_batch_size": args.eval_batch_size,
        "eval_workers": args.eval_workers,
        "reference_precision": "fp32",
    }
    seeds_began = time.perf_counter()
    reserve = 90.0 if args.precisions else 30.0  # the quantized evaluations, the statistics and the files

    def one_seed(seed: int) -> Dict[str, Any]:
        result = launch({**spec, "seed": seed}, work, f"seed{seed}", timeout=left(reserve))
        result.setdefault("seed", seed)
        state = "failed" if "error" in result else result.get("stopped", "done")
        print(f"seed {seed}: {state} after {result['process_s']:.0f} s", flush=True)
        return result

    with ThreadPoolExecutor(args.jobs or len(args.seeds)) as pool:
        seeds = list(pool.map(one_seed, args.seeds))
    seeds_s = time.perf_counter() - seeds_began

    # 3. the best KD loss's students at each precision, on the same questions
    best = best_kd_loss(seeds, args.losses)
    quantized_began = time.perf_counter()
    remaining = left(30.0)
    if best is not None and args.precisions and (remaining is None or remaining > 30):

        def one_quantized(seed_result: Dict[str, Any]) -> None:
            run = seed_result.get("runs", {}).get(best, {})
            if "checkpoint" not in run:
                return
            result = launch(
                {
                    **spec,
                    "phase": "quantized",
                    "seed": seed_result["seed"],
                    "loss": best,
                    "checkpoint": run["checkpoint"],
                    "precisions": args.precisions,
                },
                work,
                f"quantized{seed_result['seed']}",
                timeout=left(30.0),
            )
            if "models" in result:
                seed_result.setdefault("models", {}).update(result["models"])
            state = "failed" if "error" in result else result.get("stopped", "done")
            seed_result["quantized"] = {
                "state": state,
                "process_s": result.get("process_s"),
                **({"error": result["error"]} if "error" in result else {}),
            }
            print(
                f"seed {seed_result['seed']}, {best} quantized: {state} after {result['process_s']:.0f} s", flush=True
            )

        with ThreadPoolExecutor(args.jobs or len(args.seeds)) as pool:
            list(pool.map(one_quantized, seeds))
    quantized_s = time.perf_counter() - quantized_began

    # 3. statistics and the results files
    loss_cfg = compose([*overrides, "distill_loss=forward_kl"])
    settings = {
        "max_steps": cfg.train.max_steps,
        "batch_size": cfg.hardware.batch_size,
        "lr": cfg.train.lr,
        "temperature": loss_cfg.distill_loss.temperature,
        "alpha": args.kd_alpha if args.kd_alpha is not None else loss_cfg.distill_loss.alpha,
        "num_frames": cfg.data.num_frames,
        "kinds": list(cfg.data.kinds),
        "validation_size": cfg.data.validation_size,
        "pretrain_train_size": cfg.data.train_size,
    }
    data = run_meta(
        device,
        experiment=args.experiment,
        commit=args.commit or git_commit(),
        overrides=overrides,
        losses=args.losses,
        precisions=args.precisions,
        transfer_size=args.transfer_size,
        settings=settings,
        pretrained=pretrained,
    )
    data["timing"] = {
        "pretrain_s": pretrain_s,
        "seeds_s": seeds_s,
        "quantized_s": quantized_s,
        "total_s": time.perf_counter() - began,
    }
    data["seeds"] = seeds
    data["analysis"] = analyse(data)
    table = markdown(data)
    path = results_path(args.results_dir, "proxy_study", device)
    points = data.pop("seeds")
    write_pair(path, {**data, "points": points}, table)
    print(table)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
