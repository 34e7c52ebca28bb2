"""The matrix of bad input: each case ends the job with exit status 2 and a message that names
the bad value and what is valid, and writes nothing (no MLflow run, no checkpoint). The cases run
the job in this process (firstsight.suite.dispatch.run_task on the composed config: validation, then the
MLflow run), which is what run.py does after composing; one case goes through run.py.

Rows of the matrix covered by other files (not repeated here):

Config
  unknown group choice ........ test_cli.py::test_bad_input_exits_nonzero_before_anything_is_built[unknown-choice]
  unknown key ................. here: test_an_unknown_key_names_the_valid_keys_and_exits_2 (run.py, -m, --cfg),
                                test_a_key_appended_with_plus_that_nothing_reads_is_refused (+key=value),
                                test_config.py::test_wrong_types_and_keys_fail_at_composition[train.bogus=1] (compose API)
  wrong type .................. test_cli.py::test_bad_input_exits_nonzero_before_anything_is_built[wrong-type],
                                test_config.py::test_wrong_types_and_keys_fail_at_composition
  batch size, temperature, alpha, learning rate, grad_accum_steps, beta
                                test_config.py::test_invalid_values_are_refused_with_the_value_and_what_is_valid,
                                test_cli.py::test_bad_input_exits_nonzero_before_anything_is_built[negative-batch]
  LoRA rank, target modules ... test_lora_export.py::test_bad_export_and_lora_input_exits_2
  top-k (teacher cache) ....... test_teacher_cache.py::test_validation
  hidden-state term ........... test_hidden_loss.py (distill_loss.hidden_* settings)
  a quantized trainable student without LoRA
                                test_config.py::test_invalid_values_are_refused...[precision.parts.language.quantization=nf4],
                                test_edge.py::test_quantizing_a_part_of_a_student_trained_in_full_is_refused
  the no-KD control with a KD weight .. test_runs.py::test_no_kd_with_a_kd_weight_is_refused
  multi-GPU on CPU ............ test_config.py::test_invalid_values_are_refused...[hardware.num_gpus=2], [hardware=gpu]
  a memory budget ............. test_edge.py::test_bad_budgets_are_refused (bad values; a budget outside task=profile).
                                A budget smaller than the model's weights is not refused: it is what
                                task=profile measures, the verdict "does not fit"
                                (test_edge.py::test_an_out_of_memory_under_a_cuda_cap_is_the_result_does_not_fit)
  a missing model path ........ test_config.py::test_invalid_values_are_refused...[model.student.source=/does/not/exist]
  a hub id while offline ...... test_config.py::test_invalid_values_are_refused...[model=qwen2vl_7b_2b]
  a quantization backend missing  test_cli.py::test_bad_input_exits_nonzero_before_anything_is_built[backend-cannot-run-here]
Data
  missing / unreadable / corrupt image or video, malformed JSON line, missing fields, answer index
  out of range, special tokens ... test_jsonl_data.py::test_bad_records_are_named_by_file_and_line_then_stop_or_are_skipped
  nothing valid in a file ..... test_jsonl_data.py::test_a_file_with_nothing_valid_is_an_error_even_when_skipping
  a missing data file (with where it was set) .. test_jsonl_data.py::test_run_py_names_a_missing_data_file_and_where_it_was_set
  bad data settings ........... test_jsonl_data.py::test_invalid_file_data_settings_are_refused
  a sample longer than the maximum length (data.max_length) .. here: test_a_sample_longer_than_max_length_*,
                                test_a_max_length_below_the_synthetic_samples_is_refused
Models
  different tokenizers ........ test_vocab_alignment.py::test_a_distill_job_with_another_tokenizer_stops_before_its_run (before any run)
  a half-written or corrupt resumable checkpoint .. test_resume.py::test_broken_checkpoints_are_skipped;
                                a resume with other settings: test_resume.py::test_resume_with_other_settings_is_refused
  safetensors that do not match config.json .. here: test_safetensors_that_do_not_match_the_config_are_refused_*
                                (before the run, from the headers; and again when loaded)
  a directory that is not a model or is an adapter .. test_lora_export.py::test_bad_export_and_lora_input_exits_2,
                                test_lora_export.py::test_evaluating_an_adapter_directory_points_at_the_merged_student
Faults (OOM, NaN, tracking store, full disk): test_faults.py. Security defaults: test_security.py.
"""

from __future__ import annotations

import pytest
from conftest import compose

from firstsight.config.record import config_record
from firstsight.config.specs import model_spec


@pytest.mark.parametrize(
    "overrides",
    [
        ["distill_loss=jsd"],  # beta 0.5
        ["distill_loss=jsd", "distill_loss.beta=0.01"],
        ["distill_loss=jsd", "distill_loss.beta=0.99"],
        ["distill_loss=skew_forward_kl"],  # skew 0.1
        ["distill_loss=skew_forward_kl", "distill_loss.skew=0"],  # the plain forward KL: not zero
        ["distill_loss=skew_reverse_kl", "distill_loss.skew=0"],
        ["distill_loss=skew_reverse_kl", "distill_loss.skew=0.99"],
        ["distill_loss=forward_kl", "distill_loss.alpha=1"],
        ["distill_loss=none"],  # alpha 0: the control, without the teacher
        ["distill_loss=forward_kl", "distill_loss.alpha=0", "distill_loss.hidden_weight=0.5"],  # CE + the hidden term
    ],
)
def test_the_valid_neighbours_of_the_refused_loss_settings_are_accepted(overrides):
    from firstsight.suite.validate import validate

    validate(compose(overrides))


@pytest.fixture(scope="module")
def saved_student(tmp_path_factory, cache_dir):
    """A tiny student as save_pretrained writes it, and its processor."""
    from firstsight.models.loading import load_model, load_processor

    cfg = compose(["hardware.num_threads=1"])
    processor = load_processor(cfg.model, cfg.cache_dir)
    path = tmp_path_factory.mktemp("student") / "student"
    load_model(model_spec(cfg), "student", processor, "cpu", frozen=False).model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _copy(saved_student, tmp_path):
    import shutil

    path = tmp_path / "student"
    shutil.copytree(saved_student, path)
    return path


def _loaded_name(key):
    """The model's name of a tensor save_pretrained stored as the hub's Qwen2-VL files name it
    (model.layers.*, visual.*), which transformers renames when it loads it."""
    if key.startswith("visual."):
        return "model." + key
    return key.replace("model.", "model.language_model.", 1) if key.startswith("model.") else key


def _model_layout(path):
    """The checkpoint's tensors renamed to the model's own names (model.language_model.*, model.visual.*)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    assert any(k.startswith("visual.") for k in tensors)  # save_pretrained writes the hub's names
    save_file(
        {_loaded_name(k): v for k, v in tensors.items()}, str(path / "model.safetensors"), metadata={"format": "pt"}
    )


def test_checkpoints_whose_tensors_transformers_renames_are_not_refused(tmp_path, saved_student):
    """save_pretrained writes the hub's Qwen2-VL names (model.layers.*, visual.*), which transformers
    renames on loading (model.language_model.layers.*, model.visual.*); a file may also hold the
    model's own names. The header check applies transformers' renaming: a good checkpoint passes in
    either layout (and loads)."""
    from transformers import Qwen2VLForConditionalGeneration

    from firstsight.suite.validate.environment import _model_dir_problem

    assert _model_dir_problem(saved_student, "student", weights_needed=True) is None
    path = _copy(saved_student, tmp_path)
    _model_layout(path)
    assert _model_dir_problem(path, "student", weights_needed=True) is None
    _, info = Qwen2VLForConditionalGeneration.from_pretrained(str(path), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]


def test_a_resumable_checkpoint_of_another_model_is_refused(tmp_path):
    import torch

    from firstsight.core.errors import FirstSightError
    from firstsight.training.resume import Checkpointer, named_trained_tensors, read_point

    def parts(model):
        optimizer = torch.optim.AdamW(model.parameters())
        return (
            optimizer,
            torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
            torch.amp.GradScaler("cpu", enabled=False),
        )

    cfg = compose([])
    saved = Checkpointer(
        cfg.train, config_record(cfg), tmp_path, named_trained_tensors(torch.nn.Linear(3, 2)), run_id="r"
    ).save(4, *parts(torch.nn.Linear(3, 2)), {"epoch": 0, "batches_into_epoch": 4}, {"loss": 1.0})
    for other, fragment in [
        (torch.nn.Linear(4, 2), "weight has shape (2, 3), this run's has (2, 4)"),
        (
            torch.nn.Linear(3, 2, bias=False),
            "does not hold this run's trained tensors (missing: [], unexpected: ['bias'])",
        ),
    ]:
        checkpointer = Checkpointer(
            cfg.train, config_record(cfg), tmp_path, named_trained_tensors(other), run_id="r", resume=read_point(saved)
        )
        with pytest.raises(FirstSightError) as err:
            checkpointer.restore(*parts(other))
        assert str(saved) in str(err.value) and fragment in str(err.value)
