"""LoRA / QLoRA students and the export task: adapters alone train, a merged student equals the
adapted one, and the distill → evaluate → export → report sequence ends in a directory that stock
transformers loads and generates with, in a process that never imports firstsight."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import default_store_runs

SHORT = [
    "train.max_steps=3",
    "train.warmup_steps=1",
    "train.throughput_warmup_steps=1",
    "data.validation_size=8",
    "train.progress_bar=false",
]


STOCK_LOAD = textwrap.dedent("""
    import sys
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    path = sys.argv[1]
    model = Qwen2VLForConditionalGeneration.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the cup?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (112, 112), "red")], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4, out.shape
    assert not any(name.startswith("firstsight") for name in sys.modules), "firstsight was imported"
    print("generated:", processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:]))
""")


def _stock_generate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", STOCK_LOAD, str(path)], capture_output=True, text=True, timeout=300, cwd="/"
    )


def _only(paths):
    paths = list(paths)
    assert len(paths) == 1, paths
    return paths[0]


def test_distill_evaluate_export_report_with_lora(run_cli, tmp_path):
    distilled = run_cli("lora.enabled=true", "lora.rank=4", *SHORT)
    assert distilled.returncode == 0, distilled.stderr[-3000:]
    student = _only(tmp_path.glob("outputs/*/*/checkpoints/student"))
    adapter = student.parent / "student_adapter"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    record = json.loads((student / "firstsight_run.json").read_text())
    assert record["config"]["lora"]["rank"] == 4
    run = _only(default_store_runs(tmp_path))
    assert record["mlflow_run_id"] == run.info.run_id
    metrics = run.data.metrics
    assert 0 < metrics["model/trainable_params_b"] < metrics["model/params_b"]
    assert run.data.tags["firstsight.checkpoint"] == str(student)

    evaluated = run_cli(
        "task=evaluate",
        f"model.student.source={student}",
        "model.student.weights=pretrained",
        "data.validation_size=8",
        "train.progress_bar=false",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]

    out = tmp_path / "exported"
    exported = run_cli("task=export", f"task.checkpoint={student}", f"task.output_dir={out}")
    assert exported.returncode == 0, exported.stderr[-3000:]
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "forward_kl" in card and "rank 4" in card
    assert f"`{run.info.run_id}`" in card and "eval/student_accuracy" in card
    loaded = _stock_generate(out)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "generated:" in loaded.stdout

    reported = run_cli("task=report", f"task.output_dir={tmp_path / 'report'}")
    assert reported.returncode == 0, reported.stderr[-3000:]
    report = (tmp_path / "report" / "report.md").read_text()
    assert run.info.run_id[:8] in report
    tasks = {r.data.tags["firstsight.task"] for r in default_store_runs(tmp_path)}
    assert tasks == {"distill", "evaluate", "export", "report"}


def test_qlora_student_exports_merged_and_as_adapter(run_cli, tmp_path):
    # a random student: its adapter's base is no checkpoint (the shipped student base would merge)
    distilled = run_cli(
        "lora.enabled=true",
        "precision=nf4",
        "model.student.weights=random",
        "train.eval_at_end=false",
        "tracking.enabled=false",
        *SHORT,
    )
    assert distilled.returncode == 0, distilled.stderr[-3000:]
    student = _only(tmp_path.glob("outputs/*/*/checkpoints/student"))
    config = json.loads((student / "config.json").read_text())
    assert "quantization_config" not in config  # merged and dequantized: loads without bitsandbytes
    loaded = _stock_generate(student)
    assert loaded.returncode == 0, loaded.stderr[-3000:]

    adapter = student.parent / "student_adapter"
    out = tmp_path / "adapter-export"
    exported = run_cli(
        "task=export",
        f"task.checkpoint={adapter}",
        "task.merge_lora=false",
        f"task.output_dir={out}",
        "tracking.enabled=false",
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and "PeftModel" in (out / "README.md").read_text()
    # merging needs a loadable base; a random tiny base is not one, and the message says what to do
    merged = run_cli("task=export", f"task.checkpoint={adapter}", "tracking.enabled=false")
    assert merged.returncode == 2
    assert "cannot be loaded here" in merged.stderr and str(student) in merged.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["task=export"], "task.checkpoint=None"),
        (["task=export", "task.checkpoint=/no/such/dir"], "no such directory"),
        (["task=export", "task.checkpoint=."], "is not a checkpoint"),
        (["task=evaluate", "model.student.source=."], "has no config.json"),
        (["lora.enabled=true", "lora.rank=0"], "lora.rank=0"),
        (["lora.enabled=true", "lora.target_modules=[]"], "lora.target_modules=[]"),
    ],
)
def test_bad_export_and_lora_input_exits_2(run_cli, tmp_path, args, fragment):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluating_an_adapter_directory_points_at_the_merged_student(run_cli, tmp_path):
    adapter = tmp_path / "checkpoints" / "student_adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    result = run_cli("task=evaluate", f"model.student.source={adapter}")
    assert result.returncode == 2
    assert "is a LoRA adapter, not a model" in result.stderr and "checkpoints/student" in result.stderr
