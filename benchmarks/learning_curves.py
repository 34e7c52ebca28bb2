"""Learning curves of the tiny student: validation exact match, overall and per question kind, every
`--every` optimizer steps while it trains on fresh samples. Each curve is one mode:

- `ce`: cross-entropy on the ground-truth answer tokens (what distill_loss=none trains, the distill
  task's control, and the pre-training's loss; the configured distill_loss is not used), from the
  configured student (the shipped base, or random init with model.student.weights=random); the
  teacher is not loaded;
- `kd`: the configured distill_loss (default forward_kl) from the configured teacher, exactly the
  distill task's step (firstsight.tasks.distill.step_inputs, firstsight.losses.build.build_loss).

The train split holds `--train-size` samples (data.train_size, 1e6: every draw is a new sample) of
seed `--train-seed` (1: not seed 0's split the tiny models were pre-trained on); where the config
leaves model.<side>.tiny.pretrain_train_size unset it is pinned to the config's own data.train_size,
so the shipped teacher and base are reused instead of being pre-trained again for the large split.
Every curve answers the same `--validation-size` questions of the run's seed (collated once), by the
distill task's end-of-run measure (firstsight.training.loop.answer_outcomes: teacher-forced exact
match), before the first step and every `--every` steps. Steps, batch, learning rate (cosine decay
over train.max_steps after a linear warm-up) and everything else come from the composed config: the
flags below set train.max_steps, hardware.batch_size, train.lr, ... and any run.py override after
them (for every curve) or in a curve's own overrides wins.

Curves run side by side, one process each (`--curve NAME="MODE [OVERRIDES...]"`, repeatable;
without one: `ce` and `kd` from the configured student). A process writes its curve after every
evaluation, so `--time-budget-s` keeps what each curve measured by then.

    python benchmarks/learning_curves.py                    # GPU: CE and KD from the shipped base
    python benchmarks/learning_curves.py --curve A64="ce model.student.weights=random" \\
        --curve S128="ce model.student.weights=random model.student.tiny.hidden_size=128 \\
        model.student.tiny.intermediate_size=256 model.student.tiny.vision_embed_dim=128" --time-budget-s 540
    python benchmarks/learning_curves.py --smoke            # CPU: the plumbing on the tiny pair (~10 s)
    python benchmarks/learning_curves.py --render benchmarks/results/learning_curves_<device>.json

Prints a table and writes JSON (device, versions, date, git commit, command, each curve's settings
and checkpoints) + Markdown to benchmarks/results/learning_curves_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from _common import RESULTS, cuda_device, read_results, results_path, run_meta, write_pair
from generation import compose  # benchmarks/generation.py

from firstsight.config.specs import model_spec

MODES = ("ce", "kd")
DEFAULT_CURVES = ("ce=ce", "kd=kd")  # without --curve: CE and KD from the configured student
SMOKE = dict(steps=4, batch_size=4, every=2, validation_size=16, eval_batch_size=16, workers=0)


# ------------------------------------------------------------------------------- the curves


def parse_curve(text: str) -> Dict[str, Any]:
    """`NAME=MODE [OVERRIDES...]` -> {"name", "mode", "overrides"}."""
    name, sep, rest = text.partition("=")
    words = shlex.split(rest)
    if not sep or not name or not words or words[0] not in MODES:
        raise argparse.ArgumentTypeError(f"--curve {text!r}: expected NAME=MODE [OVERRIDES...], MODE one of {MODES}")
    return {"name": name, "mode": words[0], "overrides": words[1:]}


def flag_overrides(args: argparse.Namespace) -> List[str]:
    """The flags as run.py overrides (before every other override, which may change them)."""
    warmup = args.steps // 10 if args.warmup_steps is None else args.warmup_steps
    return [
        f"hardware={args.hardware}",
        f"train.max_steps={args.steps}",
        f"train.warmup_steps={warmup}",
        f"train.lr={args.lr}",
        f"hardware.batch_size={args.batch_size}",
        f"hardware.eval_batch_size={args.eval_batch_size}",
        f"hardware.dataloader_workers={args.workers}",
        f"data.validation_size={args.validation_size}",
        "train.progress_bar=false",
        "tracking.enabled=false",
    ]


def pinned_pretraining(overrides: Sequence[str]) -> List[str]:
    """model.<side>.tiny.pretrain_train_size=<the config's data.train_size> for each side that leaves
    it unset, so that the large train split does not ask for a new pre-trained model (the defaults:
    the shipped teacher). The config's data.train_size is read without any `data.train_size=` override."""
    cfg = compose([o for o in overrides if not o.lstrip("+~").startswith("data.train_size=")])
    return [
        f"model.{side}.tiny.pretrain_train_size={cfg.data.train_size}"
        for side in ("teacher", "student")
        if cfg.model[side].tiny.get("pretrain_train_size") is None
    ]


def curve_overrides(args: argparse.Namespace, curve: Dict[str, Any]) -> List[str]:
    """A curve's overrides, later ones winning: the flags', the large train split, the pins, the
    curve's own, the trailing ones (every curve's)."""
    given = [*flag_overrides(args), *curve["overrides"], *args.overrides]
    return [
        *flag_overrides(args),
        f"data.train_size={args.train_size}",
        *pinned_pretraining(given),
        *curve["overrides"],
        *args.overrides,
    ]


def by_kind(outcomes: Sequence[bool], kinds: Sequence[str]) -> Dict[str, float]:
    right: Dict[str, List[bool]] = {}
    for ok, kind in zip(outcomes, kinds):
        right.setdefault(kind, []).append(ok)
    return {kind: sum(v) / len(v) for kind, v in sorted(right.items())}


def measured(outcomes: Sequence[bool], kinds: Sequence[str]) -> Dict[str, Any]:
    from firstsight.evaluation import stats

    estimate = stats.proportion(outcomes)
    return {
        "accuracy": estimate.value,
        "low": estimate.low,
        "high": estimate.high,
        "correct": int(sum(outcomes)),
        "by_kind": by_kind(outcomes, kinds),
    }


def pretraining_of(origin: str) -> Optional[Dict[str, Any]]:
    """What the pre-training of a tiny model recorded (None for random weights or another model)."""
    from firstsight.core.files import read_info

    try:
        return read_info(Path(origin))
    except (OSError, ValueError):  # not a tiny model's directory
        return None


def worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One curve in this process; its result so far is written to spec["out"] after every evaluation."""
    import torch

    from firstsight.core.runtime import device_type, torch_dtype
    from firstsight.data import load_split
    from firstsight.data.batching import QACollator, batches, in_order
    from firstsight.losses import NoKD
    from firstsight.losses.build import build_loss
    from firstsight.models.loading import load_model, load_processor
    from firstsight.models.positions import same_rope
    from firstsight.tasks.distill import loop_settings, step_inputs
    from firstsight.training.loop import answer_outcomes, optimize

    cfg = compose(spec["overrides"])
    if cfg.hardware.num_threads:
        torch.set_num_threads(cfg.hardware.num_threads)
    device, dtype = device_type(cfg.hardware), torch_dtype(cfg.precision.dtype)
    kd = spec["mode"] == "kd"
    loss_fn = build_loss(cfg.distill_loss) if kd else NoKD(temperature=1.0, alpha=0.0)  # ce: plain CE
    processor = load_processor(cfg.model, cfg.cache_dir)
    teacher = load_model(model_spec(cfg), "teacher", processor, device, frozen=True) if kd else None
    student = load_model(model_spec(cfg), "student", processor, device, frozen=False)
    model = student.model
    collator = QACollator(processor, pad_to_multiple_of=cfg.hardware.pad_to_multiple_of)
    validation = load_split(cfg.data, "validation", cfg.seed, processor)
    kinds = [validation.kind_of(i) if hasattr(validation, "kind_of") else "" for i in range(len(validation))]
    eval_batches = list(in_order(validation, collator, cfg.hardware.eval_batch_size or cfg.hardware.batch_size))
    train = load_split(cfg.data, "train", spec["train_seed"], processor)
    result: Dict[str, Any] = {
        "name": spec["name"],
        "mode": spec["mode"],
        "overrides": spec["overrides"],
        "curve_overrides": spec["curve_overrides"],
        "settings": {
            "device": device,
            "precision": cfg.precision.name,
            "batch_size": cfg.hardware.batch_size * cfg.hardware.grad_accum_steps,
            "lr": cfg.train.lr,
            "warmup_steps": cfg.train.warmup_steps,
            "max_steps": cfg.train.max_steps,
            "every": spec["every"],
            "train_size": len(train),
            "train_seed": spec["train_seed"],
            "validation_size": len(validation),
            "validation_seed": cfg.seed,
            "chance": validation.chance_accuracy(),
            "loss": cfg.distill_loss.name if kd else "ce",
            **({"temperature": cfg.distill_loss.temperature, "alpha": cfg.distill_loss.alpha} if kd else {}),
        },
        "student": {
            "params": student.params_b * 1e9,
            "origin": student.origin,
            "pretraining": pretraining_of(student.origin),
        },
        "checkpoints": [],
    }

    def save() -> None:
        Path(spec["out"]).write_text(json.dumps(result))

    def evaluate(m: Any) -> Dict[str, Any]:
        return measured(answer_outcomes(m, iter(eval_batches), device, dtype), kinds)

    if teacher is not None:
        began = time.perf_counter()
        result["teacher"] = {
            "params": teacher.params_b * 1e9,
            "origin": teacher.origin,
            "pretraining": pretraining_of(teacher.origin),
            **evaluate(teacher.model),
            "eval_s": time.perf_counter() - began,
        }
        print(f"{spec['name']} teacher {result['teacher']['accuracy']:.4f}", flush=True)
    teacher_runs = teacher is not None and loss_fn.uses_teacher
    share_positions = cfg.train.host_positions and (not teacher_runs or same_rope(model, teacher.model))
    answer_positions_only = cfg.train.logits == "answer_positions"

    def step(batch: Dict[str, Any], answer_tokens: int) -> Dict[str, Any]:
        inputs, labels = step_inputs(batch, model, share_positions, answer_positions_only)
        student_logits = model(**inputs).logits
        if teacher_runs:
            with torch.no_grad(), torch.autocast(device, enabled=False):
                teacher_logits = teacher.model(**inputs).logits
        else:
            teacher_logits = student_logits.detach()
        out = loss_fn(student_logits, teacher_logits, labels, num_answer_tokens=answer_tokens)
        return {"loss": out.loss}

    began = time.perf_counter()
    losses: List[float] = []
    samples_seen = [0]

    def checkpoint(step_number: int) -> None:
        eval_began = time.perf_counter()
        point = {"step": step_number, "samples": samples_seen[0], **evaluate(model)}
        point["eval_s"] = time.perf_counter() - eval_began
        point["elapsed_s"] = time.perf_counter() - began
        if losses:
            point["step_loss"] = losses[-1]
            point["mean_loss"] = sum(losses) / len(losses)  # over the steps since the last evaluation
            losses.clear()
        result["checkpoints"].append(point)
        save()
        print(
            f"{spec['name']} step {step_number}: {point['accuracy']:.4f} "
            + " ".join(f"{k} {v:.2f}" for k, v in point["by_kind"].items())
            + f" ({point['elapsed_s']:.0f} s)",
            flush=True,
        )

    def on_step(step_number: int, metrics: Dict[str, float], seconds: float, samples: int, tokens: int) -> None:
        if not math.isfinite(metrics["loss"]):
            raise RuntimeError(f"the loss is {metrics['loss']} at step {step_number}")
        losses.append(metrics["loss"])
        samples_seen[0] += samples
        if step_number % spec["every"] == 0 or step_number == cfg.train.max_steps:
            checkpoint(step_number)

    checkpoint(0)
    torch.manual_seed(cfg.seed)
    optimize(
        model,
        batches(train, collator, cfg.hardware.batch_size, seed=cfg.seed, workers=cfg.hardware.dataloader_workers),
        step,
        dataclasses.replace(loop_settings(cfg), progress_bar=False),  # the distill task's settings
        device,
        dtype,
        on_step,
    )
    result["train_s"] = time.perf_counter() - began
    return result


def run_worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = worker(spec)
    except BaseException as err:  # noqa: BLE001 - recorded beside what was measured
        out = Path(spec["out"])
        result = json.loads(out.read_text()) if out.is_file() else {"name": spec["name"], "mode": spec["mode"]}
        result["error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}"
        out.write_text(json.dumps(result))
        raise
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


def run_curves(specs: List[Dict[str, Any]], work: Path, budget: Optional[float]) -> List[Dict[str, Any]]:
    """Each curve in a process of its own, all side by side; past `budget` seconds the ones still
    running are stopped and keep what they measured (marked `stopped`)."""
    began = time.perf_counter()
    running = []
    for spec in specs:
        spec = {**spec, "out": str(work / f"{spec['name']}.result.json")}
        spec_path, log_path = work / f"{spec['name']}.spec.json", work / f"{spec['name']}.log"
        spec_path.write_text(json.dumps(spec))
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
                start_new_session=True,  # its own process group: it and its data-loading processes
            )
        running.append((spec, process, log_path))
    curves = []
    for spec, process, log_path in running:
        stopped = False
        try:
            left = None if budget is None else max(1.0, budget - (time.perf_counter() - began))
            returncode = process.wait(timeout=left)
        except subprocess.TimeoutExpired:
            stopped = True
            os.killpg(process.pid, signal.SIGKILL)
            returncode = process.wait()
        out = Path(spec["out"])
        curve = json.loads(out.read_text()) if out.is_file() else {"name": spec["name"], "mode": spec["mode"]}
        curve.setdefault("overrides", spec["overrides"])
        curve["process_s"] = time.perf_counter() - began
        if stopped:
            curve["stopped"] = f"stopped at the time budget after {curve['process_s']:.0f} s"
        elif returncode != 0 and "error" not in curve:
            curve["error"] = f"exit status {returncode}: " + log_path.read_text(errors="replace")[-2000:]
        state = "failed" if "error" in curve else "stopped" if stopped else "done"
        print(f"curve {spec['name']}: {state} after {curve['process_s']:.0f} s ({log_path})", flush=True)
        curves.append(curve)
    return curves


# ------------------------------------------------------------------------------ report


def _acc(point: Dict[str, Any]) -> str:
    if point.get("low") is None:
        return f"{point['accuracy']:.3f}"
    return f"{point['accuracy']:.3f} [{point['low']:.3f}, {point['high']:.3f}]"


def _million(n: Optional[float]) -> str:
    return "?" if n is None else f"{n / 1e6:.2f} M"


def _origin(model: Dict[str, Any]) -> str:
    info = model.get("pretraining")
    if not info:
        return Path(model.get("origin", "?")).name
    samples = f" on {info['train_size']} samples" if info.get("train_size") else ""
    return (
        f"{Path(model['origin']).name} (pre-trained {info.get('steps')} steps{samples}; "
        f"{info.get('validation_accuracy', math.nan):.3f} on its {info.get('validation_size')} validation questions)"
    )


def markdown(data: Dict[str, Any]) -> str:
    curves = data["points"]
    versions = data.get("versions")
    lines = [
        f"# Learning curves: validation exact match while training — {data['device']}",
        "",
        f"{data['date']}; git commit `{data.get('commit') or 'unknown'}`; `{data['command']}`; versions: "
        + (", ".join(f"{k} {v}" for k, v in versions.items()) if versions else "not recorded")
        + ".",
        "",
    ]
    for note in data.get("notes", []):
        lines += [note, ""]
    lines += [
        "Validation exact match under teacher forcing (the distill task's measure) by optimizer step, "
        "[95 % Wilson intervals]; curves with the same data settings answer the same questions. `ce`: "
        "cross-entropy on the ground truth; `kd`: the distill loss from the teacher.",
        "",
    ]
    steps = sorted({p["step"] for c in curves for p in c.get("checkpoints", [])})
    if steps:
        lines += [
            "| step | " + " | ".join(f"{c['name']} ({c['mode']})" for c in curves) + " |",
            "| --- | " + " | ".join("---" for _ in curves) + " |",
        ]
        for step in steps:
            cells = []
            for c in curves:
                point = next((p for p in c.get("checkpoints", []) if p["step"] == step), None)
                cells.append(_acc(point) if point else "")
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    for c in curves:
        s = c.get("settings", {})
        lines += ["", f"## {c['name']} ({c['mode']})", ""]
        if s:
            loss = (
                "cross-entropy"
                if c["mode"] == "ce"
                else f"{s.get('loss')} (T={s.get('temperature')}, alpha={s.get('alpha')})"
            )
            lines.append(
                f"Student {_million(c.get('student', {}).get('params'))} parameters from {_origin(c.get('student', {}))}; "
                f"{loss}, batch {s.get('batch_size')}, lr {s.get('lr')} (warm-up {s.get('warmup_steps')} steps, cosine "
                f"decay over {s.get('max_steps')}), {s.get('device')}, {s.get('precision')}; train split "
                f"{s.get('train_size')} samples of seed {s.get('train_seed')}; {s.get('validation_size')} validation "
                f"questions of seed {s.get('validation_seed')} (chance {s.get('chance', math.nan):.3f})."
            )
        if c.get("curve_overrides"):
            lines.append(f"Its overrides: `{' '.join(c['curve_overrides'])}`.")
        if "teacher" in c:
            t = c["teacher"]
            lines.append(
                f"Teacher {_million(t.get('params'))} parameters, {_origin(t)}: **{_acc(t)}** ("
                + ", ".join(f"{k} {v:.2f}" for k, v in t.get("by_kind", {}).items())
                + ")."
            )
        points = c.get("checkpoints", [])
        if points:
            kinds = sorted({k for p in points for k in p.get("by_kind", {})})
            lines += [
                "",
                "| step | samples | exact match | " + " | ".join(kinds) + " | loss (that step) | mean loss since "
                "the last row | elapsed (s) |",
                "| --- | --- | --- | " + " | ".join("---" for _ in kinds) + " | --- | --- | --- |",
            ]
            for p in points:
                loss = f"{p['step_loss']:.3f}" if p.get("step_loss") is not None else ""
                mean = f"{p['mean_loss']:.3f}" if p.get("mean_loss") is not None else ""
                elapsed = f"{p['elapsed_s']:.0f}" if p.get("elapsed_s") is not None else ""
                samples = p.get("samples")
                lines.append(
                    f"| {p['step']} | {'' if samples is None else samples} | {_acc(p)} | "
                    + " | ".join(f"{p['by_kind'][k]:.2f}" if k in p.get("by_kind", {}) else "" for k in kinds)
                    + f" | {loss} | {mean} | {elapsed} |"
                )
        for key in ("stopped", "error"):
            if c.get(key):
                lines += ["", f"{key.capitalize()}: {c[key].strip().splitlines()[-1][:300]}"]
    related = data.get("related")
    if related:
        lines += ["", "## Related measurements", "", "| what | figure | conditions |", "| --- | --- | --- |"]
        lines += [f"| {r['what']} | {r['figure']} | {r['conditions']} |" for r in related]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--curve",
        action="append",
        default=None,
        metavar='NAME="MODE [OVERRIDES...]"',
        help=f"a curve (repeatable): its name, ce or kd, and its own run.py overrides (default: {' '.join(DEFAULT_CURVES)})",
    )
    parser.add_argument(
        "--steps", type=int, default=8000, help="optimizer steps (train.max_steps: the cosine schedule's length)"
    )
    parser.add_argument("--every", type=int, default=500, help="evaluate every this many steps (and at the last)")
    parser.add_argument("--batch-size", type=int, default=32, help="hardware.batch_size")
    parser.add_argument("--lr", type=float, default=1e-3, help="train.lr (peak)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="train.warmup_steps (default: steps // 10)")
    parser.add_argument("--train-size", type=int, default=1_000_000, help="data.train_size: samples of the train split")
    parser.add_argument("--train-seed", type=int, default=1, help="seed of the train split (not the pre-training's 0)")
    parser.add_argument("--validation-size", type=int, default=1024, help="data.validation_size")
    parser.add_argument("--eval-batch-size", type=int, default=64, help="hardware.eval_batch_size")
    parser.add_argument("--workers", type=int, default=2, help="hardware.dataloader_workers of each curve")
    parser.add_argument("--hardware", default="gpu", help="the hardware group (--smoke: cpu)")
    parser.add_argument("--time-budget-s", type=float, default=None, help="stop the curves after this many seconds")
    parser.add_argument("--name", default="learning_curves", help="the results files' name")
    parser.add_argument("--commit", default=None, help="the tree's git commit (default: the checkout's)")
    parser.add_argument(
        "--work-dir", default=None, help="the curves' specs, logs and results (default: a temporary one)"
    )
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--smoke", action="store_true", help="CPU, 4 steps x batch 4, 16 questions (temporary results)")
    parser.add_argument("--render", metavar="JSON", help="re-render an earlier results file's tables and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="more run.py overrides for every curve")
    args = parser.parse_args()
    if args.worker:
        return run_worker(args.worker)
    if args.render:
        meta, points = read_results(args.render)
        print(markdown({**meta, "points": points}), end="")
        return 0
    try:
        curves = [parse_curve(text) for text in (args.curve or DEFAULT_CURVES)]
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    if len({c["name"] for c in curves}) < len(curves):
        parser.error("--curve: each curve needs a name of its own")
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.hardware = "cpu"
        args.overrides = [f"hardware.num_threads={max(1, (os.cpu_count() or 1) // len(curves))}", *args.overrides]
        if args.results_dir == str(RESULTS):
            args.results_dir = tempfile.mkdtemp(prefix="learning-curves-smoke-")
    from firstsight.core.runtime import device_type
    from firstsight.tracking.tracker import code_version

    specs = []
    for curve in curves:
        overrides = curve_overrides(args, curve)
        specs.append(
            {
                **curve,
                "overrides": overrides,
                "curve_overrides": [*curve["overrides"], *args.overrides],
                "every": args.every,
                "train_seed": args.train_seed,
            }
        )
    on_gpu = device_type(compose(specs[0]["overrides"]).hardware) == "cuda"
    device = cuda_device() if on_gpu else "cpu"
    if on_gpu and device == "cpu":
        print("no CUDA GPU visible (--smoke, or --hardware cpu: the curves on this CPU)", file=sys.stderr)
        return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="learning-curves-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    points = run_curves(specs, work, args.time_budget_s)
    data = run_meta(
        device, commit=args.commit or code_version(), flags=flag_overrides(args), seconds=time.perf_counter() - began
    )
    table = markdown({**data, "points": points})
    path = results_path(args.results_dir, args.name, device)
    write_pair(path, {**data, "points": points}, table)
    print(table)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0 if all("error" not in p for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
