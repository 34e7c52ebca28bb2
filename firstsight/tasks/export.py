"""The export task: a distilled student as a directory stock transformers loads, with a model card.

    python run.py task=export task.checkpoint=outputs/<date>/<time>/checkpoints/student

The result loads with `Qwen2VLForConditionalGeneration.from_pretrained(dir)` and
`AutoProcessor.from_pretrained(dir)`, no firstsight import needed. A LoRA adapter directory
(…/checkpoints/student_adapter) is merged into its base when `task.merge_lora` (the base must be
loadable: a hub id or a directory), else written as a peft adapter. With `task.push_to_hub` the
directory is uploaded to that hub repo when a token is configured.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token
from omegaconf import DictConfig
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from firstsight.core.errors import FirstSightError
from firstsight.core.files import staged_dir
from firstsight.core.job import job_output_dir
from firstsight.core.runtime import is_offline
from firstsight.models.loading import save_model_atomically
from firstsight.models.lora import is_adapter_dir
from firstsight.tasks.distill import RUN_RECORD

log = logging.getLogger(__name__)


def read_run_record(checkpoint: Path) -> Dict[str, Any]:
    """What made a checkpoint (config, metrics, MLflow run), or {} for checkpoints from elsewhere."""
    path = checkpoint / RUN_RECORD
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FirstSightError(f"{path} is not readable JSON ({err}); the checkpoint's run record is damaged") from err


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(record: Dict[str, Any], base_model: Optional[str], merged_from_adapter: bool, adapter: bool) -> str:
    """README.md with Hub metadata and what the run was: models, data, loss, precision, metrics."""
    config = record.get("config", {})
    model = config.get("model", {})
    loss = config.get("distill_loss", {})
    precision = config.get("precision", {})
    data = config.get("data", {})
    lora = config.get("lora", {})
    metrics = record.get("metrics", {})
    hub_base = base_model if base_model and "/" in base_model and not os.path.isdir(base_model) else None
    card_data = ModelCardData(
        library_name="peft" if adapter else "transformers",
        pipeline_tag="image-text-to-text",
        base_model=hub_base,
        tags=["firstsight", "knowledge-distillation", "qwen2-vl", "egocentric-vqa"],
    )
    lines: List[str] = [
        "# Distilled Qwen2-VL student (FirstSight)",
        "",
        "A student model trained by knowledge distillation with the FirstSight suite.",
        "",
        "## How it was made",
        "",
        f"- teacher: `{model.get('teacher', {}).get('source', 'unknown')}` "
        f"(weights: {model.get('teacher', {}).get('weights', 'unknown')})",
        f"- student base: `{model.get('student', {}).get('source', base_model or 'unknown')}` "
        f"(weights: {model.get('student', {}).get('weights', 'unknown')})",
        f"- data: `{data.get('name', 'unknown')}` (train {data.get('train_size', '?')} samples)",
        f"- loss: `{loss.get('name', 'unknown')}`, temperature {loss.get('temperature', '?')}, alpha {loss.get('alpha', '?')}",
        f"- precision: `{precision.get('name', 'unknown')}` (dtype {precision.get('dtype', '?')}, "
        f"quantization {precision.get('quantization', '?')})",
        f"- LoRA: {'rank %s, alpha %s, targets %s' % (lora.get('rank'), lora.get('alpha'), lora.get('target_modules')) if lora.get('enabled') else 'no (all weights trained)'}"
        + (" — merged into the weights" if merged_from_adapter else ""),
        f"- steps: {config.get('train', {}).get('max_steps', '?')}, seed {config.get('seed', '?')}",
    ]
    if record.get("mlflow_run_id"):
        lines.append(f"- MLflow run: `{record['mlflow_run_id']}` at `{record.get('mlflow_tracking_uri')}`")
    if record.get("versions"):
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(record["versions"].items())))
    if not record:
        lines.append("- no FirstSight run record was found beside the checkpoint: provenance unknown")
    if metrics:
        lines += ["", "## Metrics of its run", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| `{k}` | {_fmt(v)} |" for k, v in sorted(metrics.items())]
    lines += ["", "## Use", "", "```python"]
    if adapter:
        lines += [
            "from peft import PeftModel",
            "from transformers import AutoProcessor, Qwen2VLForConditionalGeneration",
            f"base = Qwen2VLForConditionalGeneration.from_pretrained({base_model!r})",
            'model = PeftModel.from_pretrained(base, "path/to/this/directory")',
        ]
    else:
        lines += [
            "from transformers import AutoProcessor, Qwen2VLForConditionalGeneration",
            'model = Qwen2VLForConditionalGeneration.from_pretrained("path/to/this/directory")',
        ]
    lines += ['processor = AutoProcessor.from_pretrained("path/to/this/directory")', "```", ""]
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _load_full(path: str, dtype: Optional[str]) -> Any:
    return Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=dtype or "auto", local_files_only=True)


def _adapter_base(checkpoint: Path) -> str:
    config = json.loads((checkpoint / "adapter_config.json").read_text(encoding="utf-8"))
    return config.get("base_model_name_or_path") or ""


def _merge_adapter(checkpoint: Path, dtype: Optional[str]) -> Any:
    from peft import PeftModel  # deferred: peft imports bitsandbytes and torchao; only adapter exports need it

    base = _adapter_base(checkpoint)
    loadable = os.path.isfile(os.path.join(base, "config.json")) or (
        bool(base) and not is_offline() and base.count("/") == 1
    )
    if not loadable:
        raise FirstSightError(
            f"task.checkpoint={str(checkpoint)!r} is a LoRA adapter whose base {base or '(unnamed)'!r} cannot be "
            f"loaded here (a random or tiny base is not a checkpoint). Export the merged student the same run "
            f"wrote beside it ({checkpoint.parent / 'student'}), or set task.merge_lora=false to write the adapter."
        )
    model = Qwen2VLForConditionalGeneration.from_pretrained(base, dtype=dtype or "auto", local_files_only=is_offline())
    return PeftModel.from_pretrained(model, str(checkpoint)).merge_and_unload()


def _copy_atomically(src: Path, out_dir: Path, extra_files: Dict[str, str]) -> None:
    with staged_dir(str(out_dir)) as tmp:
        for item in src.iterdir():
            if item.is_file():
                shutil.copy2(item, Path(tmp) / item.name)
        for name, text in extra_files.items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")


def export(cfg: DictConfig, tracker: Any) -> Dict[str, float]:
    task = cfg.task
    checkpoint = Path(os.path.expanduser(task.checkpoint)).resolve()
    out_dir = Path(task.output_dir).resolve() if task.output_dir else job_output_dir().resolve() / "export"
    dtype = task.dtype.value if task.dtype is not None and hasattr(task.dtype, "value") else task.dtype
    record = read_run_record(checkpoint)
    adapter = is_adapter_dir(str(checkpoint))
    tracker.set_tags({"firstsight.export_source": str(checkpoint), "firstsight.export_dir": str(out_dir)})
    if adapter and not task.merge_lora:
        card = model_card(record, _adapter_base(checkpoint), merged_from_adapter=False, adapter=True)
        _copy_atomically(checkpoint, out_dir, {"README.md": card})
    else:
        model = _merge_adapter(checkpoint, dtype) if adapter else _load_full(str(checkpoint), dtype)
        processor = AutoProcessor.from_pretrained(str(checkpoint), local_files_only=True)
        base = (
            _adapter_base(checkpoint)
            if adapter
            else record.get("config", {}).get("model", {}).get("student", {}).get("source")
        )
        card = model_card(record, base, merged_from_adapter=adapter, adapter=False)
        extra = {"README.md": card}
        if record:
            extra[RUN_RECORD] = json.dumps(record, indent=2)
        save_model_atomically(model, processor, str(out_dir), extra)
    size_gb = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file()) / 1e9
    metrics = {"export/size_gb": size_gb}
    log.info("exported %s to %s (%.3g GB)", checkpoint, out_dir, size_gb)
    if task.push_to_hub:
        url = push_to_hub(str(out_dir), task.push_to_hub, task.private)
        tracker.set_tags({"firstsight.hub_repo": task.push_to_hub, "firstsight.hub_commit_url": url})
    if cfg.tracking.log_model:  # the exported student as an MLflow model of this run (validate: not an adapter)
        tracker.log_model(str(out_dir))
    tracker.log_metrics(metrics)
    tracker.flush()
    return metrics


def push_to_hub(folder: str, repo_id: str, private: bool) -> str:
    """Upload `folder` to the hub repo `repo_id` (created if missing); needs a configured token."""
    if is_offline():
        raise FirstSightError(
            f"task.push_to_hub={repo_id!r}, but the hub is offline (HF_HUB_OFFLINE=1); unset it to upload"
        )
    token = get_token()
    if not token:
        raise FirstSightError(
            f"task.push_to_hub={repo_id!r} needs a hub token: set HF_TOKEN or run `hf auth login`; "
            f"the export itself is written at {folder}"
        )
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=folder, repo_id=repo_id, commit_message="Upload a FirstSight distilled student"
    )
    return str(getattr(commit, "commit_url", commit))
