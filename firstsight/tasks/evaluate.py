"""The evaluate task: accuracy of teacher and student by greedy generation, and the drop.

When a reply counts as right: firstsight/evaluation/answers.py. Every accuracy comes with its 95 % interval and
the drop is paired on the same questions (firstsight/evaluation/accuracy.py names the metrics); a quantized
teacher is also answered at full precision (the study's drop is against that one); with
`task.blind` both models also answer with grey frames ("is it looking?"). Per-question outcomes
go to eval_outcomes.json in the job's directory.

Decoding is `hardware.generation` (firstsight/inference/generation.py: `static`, the default, or `hf` =
transformers' `model.generate`; the same greedy tokens), recorded as the tags
`firstsight.generation` (student) and `firstsight.teacher_generation` (static_cuda_graph |
static_eager | hf_generate).

Also logged per model: its weights as loaded (`model/weights_gb`, `model/teacher_weights_gb`), split by
part (`.../vision`, `.../merger`, `.../language`), and its resolved per-part precision as tags
(`firstsight.precision.<part>.*` for the student, `firstsight.teacher_precision.<part>.*`).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List

from omegaconf import DictConfig
from tqdm.auto import tqdm

from firstsight.config.specs import model_spec
from firstsight.core.job import prepare_job, write_job_file
from firstsight.data import Blinded, load_split
from firstsight.data.batching import PromptCollator
from firstsight.evaluation.accuracy import Outcomes, outcome_record, summarize, teacher_is_quantized
from firstsight.evaluation.answers import is_correct, is_multiple_choice, option_letters, parse_choice  # noqa: F401 (re-exported)
from firstsight.inference.generation import decoder_for, generation_tags
from firstsight.models import loading  # loading.load_model: a module attribute, tests patch it
from firstsight.models.loading import load_processor, load_teacher_processor
from firstsight.models.parts import precision_tags
from firstsight.training.loop import to_device

log = logging.getLogger(__name__)


def generated_answers(
    model: Any,
    processor: Any,
    samples: List[Any],
    device: str,
    batch_size: int,
    max_new_tokens: int,
    progress: bool = False,
    desc: str = "",
    method: Any = "static",
) -> List[str]:
    """Greedy answers (special tokens dropped) to each sample's question, decoded by `method`
    (hardware.generation: static | hf, firstsight/inference/generation.py; both give the same tokens)."""
    collate = PromptCollator(processor)
    decoder = decoder_for(model, method)
    answers: List[str] = []
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, disable=not progress):
        batch = to_device(collate(samples[start : start + batch_size]), device)
        new_tokens = decoder.generate(batch, max_new_tokens, pad_token_id=processor.tokenizer.pad_token_id).tokens
        answers.extend(processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return answers


def accuracy_by_kind(samples: List[Any], outcomes: List[bool]) -> Dict[str, float]:
    """Overall accuracy under "all" and per question kind, from per-question outcomes."""
    right: Dict[str, List[bool]] = {"all": []}
    for sample, ok in zip(samples, outcomes):
        right["all"].append(ok)
        right.setdefault(sample.kind, []).append(ok)
    return {kind: sum(values) / len(values) for kind, values in right.items()}


def _answered_right(
    loaded: Any, questions: List[Any], desc: str, processor: Any, device: str, cfg: DictConfig
) -> List[bool]:
    """Whether each greedy answer of `loaded` to `questions` is right."""
    answers = generated_answers(
        loaded.model,
        processor,
        questions,
        device,
        cfg.task.batch_size,
        cfg.task.max_new_tokens,
        cfg.train.progress_bar,
        desc,
        cfg.hardware.generation,
    )
    return [is_correct(sample, text) for sample, text in zip(questions, answers)]


def _weights_and_precision(tracker: Any, role: str, loaded: Any) -> Dict[str, float]:
    """Tag the model and its per-part precision; its weights as loaded, whole and per part. The
    student under the plain names (model/weights_gb, firstsight.precision.*), as profile logs them."""
    student = role == "student"
    tracker.set_tags(
        {
            f"firstsight.{role}": loaded.origin,
            **precision_tags(loaded.parts, "firstsight.precision" if student else "firstsight.teacher_precision"),
        }
    )
    weights = "model/weights_gb" if student else "model/teacher_weights_gb"
    return {weights: loaded.weights_gb, **{f"{weights}/{part}": gb for part, gb in loaded.part_weights_gb.items()}}


def _tag_decoding(tracker: Any, role: str, loaded: Any, method: Any) -> None:
    """The method each model was decoded by: firstsight.generation(.*) for the student, as profile
    tags it, firstsight.teacher_generation(.*) for the teacher."""
    tags = generation_tags(decoder_for(loaded.model, method))
    if role == "teacher":
        tags = {k.replace("firstsight.generation", "firstsight.teacher_generation", 1): v for k, v in tags.items()}
    tracker.set_tags(tags)


def _accuracy_metrics(tracker: Any, result: Any) -> Dict[str, float]:
    """The accuracies with their intervals, the drops and the verdict (logged as lines and a tag);
    the student's also under the plain names eval/accuracy*."""
    summary, lines, verdict = summarize(result)
    metrics = dict(summary)
    metrics.update(
        {
            name.replace("eval/student_accuracy", "eval/accuracy", 1): value
            for name, value in summary.items()
            if name.startswith("eval/student_accuracy") and not name.startswith("eval/student_accuracy_before")
        }
    )
    for line in lines:
        (log.warning if line.startswith("WARNING") else log.info)(line.removeprefix("WARNING: "))
    if verdict is not None:
        tracker.set_tags({"firstsight.accuracy_verdict": str(verdict)})
    return metrics


def evaluate(cfg: DictConfig, tracker: Any) -> Dict[str, float]:
    # load: the processors and the questions (with grey-frame copies for task.blind)
    device = prepare_job(cfg.hardware, cfg.seed, tracker)
    processor = load_processor(cfg.model, cfg.cache_dir)
    # a teacher of another architecture reads the questions through its own processor
    processors = {"student": processor, "teacher": load_teacher_processor(cfg.model, cfg.cache_dir) or processor}
    dataset = load_split(cfg.data, cfg.task.split, cfg.seed, processor)
    if getattr(dataset, "skipped", 0):  # bad records left out under data.on_bad_sample=skip
        tracker.log_metrics({"data/skipped_samples": dataset.skipped})
    samples = [dataset[i] for i in range(len(dataset))]
    blinded = [Blinded(samples)[i] for i in range(len(samples))] if cfg.task.blind else None

    def answer(loaded: Any, questions: List[Any], desc: str) -> List[bool]:
        return _answered_right(loaded, questions, desc, processors[loaded.role], device, cfg)

    # answer: each model in turn, loaded alone
    metrics: Dict[str, float] = {}
    outcomes: Dict[str, List[bool]] = {}
    for role in ("teacher", "student"):
        loaded = loading.load_model(model_spec(cfg), role, processors[role], device, frozen=True)
        if role == "teacher":
            tracker.set_tags({"firstsight.teacher_architecture": loaded.model.config.model_type})
        metrics.update(_weights_and_precision(tracker, role, loaded))
        outcomes[role] = answer(loaded, samples, f"evaluating {role}")
        if blinded is not None:
            outcomes[f"{role}_blind"] = answer(loaded, blinded, f"evaluating {role}, grey frames")
        _tag_decoding(tracker, role, loaded, cfg.hardware.generation)
        for kind, value in accuracy_by_kind(samples, outcomes[role]).items():
            if kind != "all":
                metrics[f"eval/{role}_accuracy/{kind}"] = value
        quantized_teacher = role == "teacher" and teacher_is_quantized(loaded.parts)
        del loaded
        if quantized_teacher:  # the study's drop is against the teacher unquantized: answer with it too
            reference = loading.load_model(
                model_spec(cfg).full_precision(), "teacher", processors["teacher"], device, frozen=True
            )
            outcomes["full_precision_teacher"] = answer(reference, samples, "evaluating the full-precision teacher")
            del reference

    # measure and save: accuracies with intervals, the paired drops, per-question outcomes
    result = Outcomes(
        teacher=outcomes["teacher"],
        student=outcomes["student"],
        chance=dataset.chance_accuracy(),
        full_precision_teacher=outcomes.get("full_precision_teacher"),
        teacher_blind=outcomes.get("teacher_blind"),
        student_blind=outcomes.get("student_blind"),
    )
    metrics.update(_accuracy_metrics(tracker, result))
    write_job_file("eval_outcomes.json", outcome_record([s.kind for s in samples], result))
    tracker.log_metrics(metrics)
    tracker.flush()
    return metrics
