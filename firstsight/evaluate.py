"""The evaluate task: accuracy of teacher and student by greedy generation, and the drop.

When a reply counts as right: firstsight/answers.py.

Decoding is `hardware.generation` (firstsight/generation.py: `static`, the default, or `hf` =
transformers' `model.generate`; the same greedy tokens), recorded as the tags
`firstsight.generation` (student) and `firstsight.teacher_generation` (static_cuda_graph |
static_eager | hf_generate).

Also logged per model: its weights as loaded (`model/weights_gb`, `model/teacher_weights_gb`), split by
part (`.../vision`, `.../merger`, `.../language`), and its resolved per-part precision as tags
(`firstsight.precision.<part>.*` for the student, `firstsight.teacher_precision.<part>.*`).
"""

from __future__ import annotations

from typing import Any, Dict, List

from omegaconf import DictConfig

from firstsight.answers import is_correct, is_multiple_choice, option_letters, parse_choice  # noqa: F401 (re-exported)


def generated_answers(model: Any, processor: Any, samples: List[Any], device: str,
                      batch_size: int, max_new_tokens: int, progress: bool = False, desc: str = "",
                      method: Any = "static") -> List[str]:
    """Greedy answers (special tokens dropped) to each sample's question, decoded by `method`
    (hardware.generation: static | hf, firstsight/generation.py; both give the same tokens)."""
    from tqdm.auto import tqdm

    from firstsight.data.batching import PromptCollator
    from firstsight.generation import decoder_for
    from firstsight.train import to_device

    collate = PromptCollator(processor)
    decoder = decoder_for(model, method)
    answers: List[str] = []
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, disable=not progress):
        batch = to_device(collate(samples[start:start + batch_size]), device)
        new_tokens = decoder.generate(batch, max_new_tokens, pad_token_id=processor.tokenizer.pad_token_id).tokens
        answers.extend(processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return answers


def accuracy_by_kind(samples: List[Any], answers: List[str]) -> Dict[str, float]:
    """Overall accuracy under "all" and per question kind."""
    right: Dict[str, List[bool]] = {"all": []}
    for sample, answer in zip(samples, answers):
        ok = is_correct(sample, answer)
        right["all"].append(ok)
        right.setdefault(sample.kind, []).append(ok)
    return {kind: sum(values) / len(values) for kind, values in right.items()}


def evaluate(cfg: DictConfig, tracker: Any) -> Dict[str, float]:
    from firstsight.data import load_split
    from firstsight.generation import decoder_for, generation_tags
    from firstsight.models import load_model, load_processor
    from firstsight.job import prepare_job
    from firstsight.parts import precision_tags

    device = prepare_job(cfg, tracker)
    processor = load_processor(cfg)
    dataset = load_split(cfg.data, cfg.task.split, cfg.seed)
    if getattr(dataset, "skipped", 0):  # bad records left out under data.on_bad_sample=skip
        tracker.log_metrics({"data/skipped_samples": dataset.skipped})
    samples = [dataset[i] for i in range(len(dataset))]
    metrics: Dict[str, float] = {"eval/chance_accuracy": dataset.chance_accuracy()}
    for role in ("teacher", "student"):
        loaded = load_model(cfg, role, processor, device, frozen=True)
        # the student under the plain names (model/weights_gb, firstsight.precision.*), as profile logs them
        weights = "model/weights_gb" if role == "student" else "model/teacher_weights_gb"
        tracker.set_tags({f"firstsight.{role}": loaded.origin, **precision_tags(
            loaded.parts, "firstsight.precision" if role == "student" else "firstsight.teacher_precision")})
        metrics[weights] = loaded.weights_gb
        metrics.update({f"{weights}/{part}": gb for part, gb in loaded.part_weights_gb.items()})
        answers = generated_answers(loaded.model, processor, samples, device, cfg.task.batch_size,
                                    cfg.task.max_new_tokens, cfg.train.progress_bar, f"evaluating {role}",
                                    cfg.hardware.generation)
        # the method each model was decoded by: firstsight.generation(.*) for the student, as profile
        # tags it, firstsight.teacher_generation(.*) for the teacher
        tags = generation_tags(decoder_for(loaded.model, cfg.hardware.generation))
        tracker.set_tags(tags if role == "student" else
                         {k.replace("firstsight.generation", "firstsight.teacher_generation", 1): v for k, v in tags.items()})
        for kind, value in accuracy_by_kind(samples, answers).items():
            metrics[f"eval/{role}_accuracy" if kind == "all" else f"eval/{role}_accuracy/{kind}"] = value
        del loaded
    metrics["eval/accuracy"] = metrics["eval/student_accuracy"]
    metrics["eval/accuracy_drop"] = metrics["eval/teacher_accuracy"] - metrics["eval/student_accuracy"]
    tracker.log_metrics(metrics)
    tracker.flush()
    return metrics
