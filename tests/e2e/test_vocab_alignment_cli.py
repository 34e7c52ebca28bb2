"""Teacher and student over one tokenizer: the teacher's padding rows are cut (tests/test_losses.py
checks the loss side), a teacher whose tokenizer really differs is refused before any training."""

from __future__ import annotations


def _teacher_dir(tmp_path, cache_dir, extra_tokens=()):
    from firstsight.models.tiny import tiny_processor

    processor = tiny_processor(str(cache_dir))
    if extra_tokens:
        processor.tokenizer.add_tokens(list(extra_tokens))
    path = tmp_path / "teacher"
    processor.save_pretrained(path)
    return path, tiny_processor(str(cache_dir))


def test_a_distill_job_with_another_tokenizer_stops_before_its_run(run_cli, tmp_path, cache_dir):
    """From the command line: exit 2 naming the teacher, before any model is loaded or any MLflow
    run exists (the teacher directory is the shipped tiny teacher with one extra token)."""
    import json
    import shutil

    from firstsight.core.files import SHIPPED

    # the shipped tiny Qwen2-VL teacher (the tiny LLaVA-OneVision one ships beside it)
    (shipped,) = [
        p
        for p in SHIPPED.glob("tiny-teacher-*")
        if json.loads((p / "config.json").read_text())["model_type"] == "qwen2_vl"
    ]
    teacher = tmp_path / "teacher"
    shutil.copytree(shipped, teacher)
    processor_dir, _ = _teacher_dir(tmp_path / "tok", cache_dir, extra_tokens=["<|teacher_only|>"])
    for file in processor_dir.iterdir():
        shutil.copy(file, teacher / file.name)
    result = run_cli(f"model.teacher.source={teacher}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "use different tokenizers" in result.stderr and str(teacher) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run was created
