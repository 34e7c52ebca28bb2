"""Teacher and student over one tokenizer: the teacher's padding rows are cut (tests/test_losses.py
checks the loss side), a teacher whose tokenizer really differs is refused before any training."""

from __future__ import annotations

import pytest
from conftest import compose

from firstsight.core.errors import FirstSightError


def _teacher_dir(tmp_path, cache_dir, extra_tokens=()):
    from firstsight.models.tiny import tiny_processor

    processor = tiny_processor(str(cache_dir))
    if extra_tokens:
        processor.tokenizer.add_tokens(list(extra_tokens))
    path = tmp_path / "teacher"
    processor.save_pretrained(path)
    return path, tiny_processor(str(cache_dir))


def test_a_teacher_with_the_same_tokenizer_is_accepted(tmp_path, cache_dir):
    from firstsight.models.loading import check_same_tokenizer

    path, student_processor = _teacher_dir(tmp_path, cache_dir)
    check_same_tokenizer(compose([f"model.teacher.source={path}"]).model, student_processor)


def test_a_teacher_whose_tokenizer_differs_is_refused(tmp_path, cache_dir):
    from firstsight.models.loading import check_same_tokenizer

    path, student_processor = _teacher_dir(tmp_path, cache_dir, extra_tokens=["<|teacher_only|>"])
    with pytest.raises(FirstSightError, match="different tokenizers") as err:
        check_same_tokenizer(compose([f"model.teacher.source={path}"]).model, student_processor)
    assert str(path) in str(err.value) and "shared vocabulary" in str(err.value)


def test_the_real_pair_differs_only_in_padding_rows():
    from firstsight.models.architectures import known_config

    teacher = known_config("Qwen/Qwen2-VL-7B-Instruct").get_text_config().vocab_size
    student = known_config("Qwen/Qwen2-VL-2B-Instruct").get_text_config().vocab_size
    assert (teacher, student) == (152064, 151936)  # the loss cuts the teacher to the student's rows
