"""M-RoPE positions computed on the host (firstsight/models/positions.py) are the ones the models compute
themselves: a training forward given them returns the very logits it returns without them, for the
tiny teacher and student, on a right-padded batch of ragged samples (multi-frame questions
included), also under LoRA; the teacher and the student share one computation; a batch without
images leaves the model to its own plain positions."""

from __future__ import annotations

import pytest
import torch

from firstsight.models.positions import mrope_positions, same_rope

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pair(tiny_parts):
    from firstsight.data.batching import QACollator

    samples = tiny_parts.split("train")
    # rows of different lengths, one of them with two frames (the batch is right-padded)
    rows = sorted(range(40), key=lambda i: len(samples[i].images))[-1:] + [0, 1, 2]
    batch = QACollator(tiny_parts.processor)([samples[i] for i in rows])
    return batch, {role: tiny_parts.model(role) for role in ("teacher", "student")}


def _logits(model, batch, **extra):
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "sample_index")}
    with torch.no_grad():
        return model(**inputs, **extra).logits


def test_the_batch_is_ragged_and_has_several_frames_in_a_row(pair):
    batch, _ = pair
    mask = batch["attention_mask"]
    assert len(set(mask.sum(1).tolist())) > 1, "rows of one length would not test padding"
    assert batch["image_grid_thw"].shape[0] > batch["input_ids"].shape[0], "no row with several frames"


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_given_positions_give_the_models_own_logits(pair, role):
    batch, models = pair
    model = models[role]
    positions = mrope_positions(model, batch)
    assert positions.shape == (3, *batch["input_ids"].shape)
    assert positions.device == batch["input_ids"].device
    # vision tokens have 2-D positions: the three rows differ somewhere
    assert not torch.equal(positions[1], positions[2])
    assert torch.equal(_logits(model, batch, position_ids=positions), _logits(model, batch))


def test_one_computation_serves_teacher_and_student(pair):
    batch, models = pair
    assert same_rope(models["student"], models["teacher"])
    assert torch.equal(mrope_positions(models["student"], batch), mrope_positions(models["teacher"], batch))


def test_under_lora_the_positions_are_found_through_the_wrapper(pair):
    from peft import LoraConfig, get_peft_model

    batch, models = pair
    import copy

    wrapped = get_peft_model(copy.deepcopy(models["student"]), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert torch.equal(mrope_positions(wrapped, batch), mrope_positions(models["student"], batch))


def test_no_image_no_positions(pair):
    batch, models = pair
    text_only = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    assert mrope_positions(models["student"], text_only) is None
    assert mrope_positions(torch.nn.Linear(2, 2), batch) is None  # not a Qwen2-VL model
    assert not same_rope(models["student"], torch.nn.Linear(2, 2))
