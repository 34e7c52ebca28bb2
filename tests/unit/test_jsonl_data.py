"""QA samples read from files: LLaVA / Qwen conversations and EgoSchema-style multiple choice, bad data
named by file and line (stop or skip-and-count), the config checks, and run.py on the fixtures."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import ROOT, compose

from firstsight.core.errors import ConfigError, FirstSightError
from firstsight.data import load_split
from firstsight.data.files import FileQA, MediaSettings
from firstsight.data.synthetic import SyntheticEgoQA
from firstsight.suite.validate import validate
from firstsight.tasks.evaluate import is_multiple_choice, parse_choice

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MEDIA = FIXTURES / "media"
SMALL = MediaSettings(max_pixels=128 * 128, min_pixels=56 * 56, fps=2.0, max_frames=8)


def _within(image, media=SMALL):
    width, height = image.size
    return (
        image.mode == "RGB"
        and width % 28 == 0
        and height % 28 == 0
        and media.min_pixels <= width * height <= media.max_pixels
    )


# ------------------------------------------------------------------------------- formats


def test_llava_conversations_jsonl():
    ds = FileQA(FIXTURES / "conversations.jsonl", "conversations", media=SMALL)
    assert len(ds) == 4 and ds.skipped == 0 and ds.problems == []
    samples = [ds[i] for i in range(len(ds))]
    assert [s.index for s in samples] == [0, 1, 2, 3]
    assert samples[0].question == "What colour is the mug on the counter?"  # "<image>\n" removed
    assert samples[0].answer == "red" and samples[0].kind == "open_ended" and samples[0].num_choices == 0
    mc = samples[1]  # two images, lettered options, a letter answer: multiple choice
    assert len(mc.images) == 2 and mc.answer == "A" and mc.kind == "multiple_choice" and mc.num_choices == 4
    assert mc.question.startswith("Which way did the blue box move?\nA. left\nB. right")
    assert is_multiple_choice(mc)
    # a frame list as the video; the system turn and the second exchange are not part of the sample
    assert samples[2].question == "What is sliding across the table?"
    assert samples[2].answer == "A blue box, from right to left." and len(samples[2].images) == 4
    # a video file: 8 frames at 4 fps is 2 s, sampled at 2 fps -> 4 frames
    assert samples[3].answer == "1" and len(samples[3].images) == 4
    assert all(_within(image) for s in samples for image in s.images)
    assert ds.chance_accuracy() == pytest.approx((0 + 1 / 4 + 0 + 0) / 4)


def test_qwen_messages_json_list():
    ds = FileQA(FIXTURES / "messages.json", "conversations", media=SMALL)
    assert len(ds) == 3
    assert [ds.where(i).rsplit(":", 1)[1] for i in range(3)] == ["2", "12", "23"]  # where each record starts
    first, second, third = (ds[i] for i in range(3))
    assert (first.question, first.answer, len(first.images)) == (
        "What shape is the yellow object on the desk?",
        "a triangle",
        1,
    )
    assert (second.question, second.answer, len(second.images)) == ("Where is the blue box going?", "to your left", 3)
    assert third.answer == "green"
    big = third.images[0]  # 640x480 on disk: downscaled within max_pixels, aspect ratio kept
    assert _within(big) and big.size[0] > big.size[1]
    assert all(_within(image) for s in (first, second, third) for image in s.images)


def test_egoschema_multiple_choice_is_lettered_like_the_synthetic_questions():
    ds = FileQA(FIXTURES / "egoschema.jsonl", "egoschema", media=SMALL)
    assert len(ds) == 4
    samples = [ds[i] for i in range(4)]
    assert samples[0].question == "\n".join(
        [
            "Which way did the blue box move?",
            "A. to the left",
            "B. to the right",
            "C. towards the wearer",
            "D. away from the wearer",
            "E. it did not move",
        ]
    )
    assert [s.answer for s in samples] == ["A", "B", "C", "E"]  # answer index -> letter
    assert [s.num_choices for s in samples] == [5, 5, 4, 5]  # "option 0".."option 4", or an "options" list
    assert {s.kind for s in samples} == {"egoschema"}
    assert [len(s.images) for s in samples] == [4, 2, 2, 4]  # frames, frames, "video" as frames, a clip at 2 fps
    assert all(_within(image) for s in samples for image in s.images)
    assert is_multiple_choice(samples[0]) and parse_choice("A. to the left") == samples[0].answer
    assert ds.chance_accuracy() == pytest.approx((1 / 5 + 1 / 5 + 1 / 4 + 1 / 5) / 4)


def test_frame_sampling_is_configurable():
    ds = FileQA(FIXTURES / "egoschema.jsonl", "egoschema", media=MediaSettings(fps=1.0, max_frames=3))
    assert len(ds[0].images) == 3  # a list of 4 frames keeps 3, evenly spaced
    assert len(ds[3].images) == 2  # a 2 s clip at 1 fps
    first, last = ds[0].images[0], ds[0].images[-1]
    assert first.tobytes() != last.tobytes()  # first and last frames kept: the box moved
    assert (
        len(FileQA(FIXTURES / "egoschema.jsonl", "egoschema", media=MediaSettings(fps=8.0, max_frames=6))[3].images)
        == 6
    )


def test_fixture_answers_round_trip_through_the_tiny_tokenizer(cache_dir):
    """QACollator checks that the labelled span decodes to the answer; the tiny tokenizer is byte-level."""
    from firstsight.data.batching import QACollator
    from firstsight.models.tiny import tiny_processor

    collate = QACollator(tiny_processor(cache_dir))
    for name, fmt in [
        ("conversations.jsonl", "conversations"),
        ("messages.json", "conversations"),
        ("egoschema.jsonl", "egoschema"),
    ]:
        ds = FileQA(FIXTURES / name, fmt)
        batch = collate([ds[i] for i in range(len(ds))])
        assert (batch["labels"] != -100).sum() > 0


# ------------------------------------------------------------------------------- bad data

GOOD_EGO = {"question": "Which way?", "options": ["left", "right"], "answer": 0, "frames": [str(MEDIA / "frame0.png")]}
GOOD_CONV = {
    "image": str(MEDIA / "kitchen.png"),
    "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}],
}


def _with(base, **changes):
    record = {k: v for k, v in base.items() if k not in changes or changes[k] is not None}
    record.update({k: v for k, v in changes.items() if v is not None})
    return json.dumps(record)


BAD_CASES = {
    "malformed-line": ("egoschema", '{"question": "Which way?", "options": [', "not valid JSON"),
    "not-an-object": ("egoschema", '["a", "list"]', "expected a JSON object"),
    "missing-question": ("egoschema", _with(GOOD_EGO, question=None), "no 'question'"),
    "missing-answer": ("egoschema", _with(GOOD_EGO, answer=None), "no 'answer'"),
    "answer-out-of-range": ("egoschema", _with(GOOD_EGO, answer=2), "answer index 2 is out of range for 2 options"),
    "negative-answer": ("egoschema", _with(GOOD_EGO, answer=-1), "out of range"),
    "missing-frame": ("egoschema", _with(GOOD_EGO, frames=["nowhere/frame9.png"]), "image file not found"),
    "unreadable-image": ("egoschema", _with(GOOD_EGO, frames=["broken.png"]), "cannot read image"),
    "missing-video": ("egoschema", _with(GOOD_EGO, frames=None, video="nowhere.mp4"), "video file not found"),
    "unreadable-video": ("egoschema", _with(GOOD_EGO, frames=None, video="broken.mp4"), "cannot read video"),
    "no-media": ("egoschema", _with(GOOD_EGO, frames=None), "no 'video'"),
    "missing-image": ("conversations", _with(GOOD_CONV, image="missing.jpg"), "image file not found"),
    "no-assistant-turn": (
        "conversations",
        _with(GOOD_CONV, conversations=[{"from": "human", "value": "<image>\nQ?"}]),
        "not followed by an assistant turn",
    ),
    "no-image": ("conversations", _with(GOOD_CONV, image=None), "no image or video"),
    "special-token": (
        "conversations",
        _with(
            GOOD_CONV,
            conversations=[{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "red<|im_end|>"}],
        ),
        "special token",
    ),
    "neither-style": (
        "conversations",
        json.dumps({"image": str(MEDIA / "kitchen.png"), "question": "Q?"}),
        "neither 'conversations'",
    ),
}


def _bad_file(tmp_path, fmt, bad_line):
    """A good record, a blank line, the bad one (line 3), another good one."""
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    good = json.dumps(GOOD_EGO if fmt == "egoschema" else GOOD_CONV)
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("\n".join([good, "", bad_line, good]) + "\n")
    return path


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_records_are_named_by_file_and_line_then_stop_or_are_skipped(tmp_path, caplog, case):
    fmt, bad_line, fragment = BAD_CASES[case]
    path = _bad_file(tmp_path, fmt, bad_line)
    with pytest.raises(FirstSightError) as err:
        FileQA(path, fmt, on_bad_sample="error")
    message = str(err.value)
    assert message.startswith(f"{path}:3: ") and fragment in message, message
    assert "data.on_bad_sample=skip" in message  # says how to carry on instead

    with caplog.at_level(logging.WARNING, logger="firstsight.data.files"):
        ds = FileQA(path, fmt, on_bad_sample="skip")
    assert ds.skipped == 1 and len(ds) == 2 and [ds[i].index for i in range(2)] == [0, 1]
    assert ds.problems[0].startswith(f"{path}:3: ") and fragment in ds.problems[0]
    assert [ds.where(i) for i in range(2)] == [f"{path}:1", f"{path}:4"]
    logged = caplog.text
    assert ds.problems[0] in logged and "skipped 1 bad record(s), kept 2" in logged


def test_a_file_with_nothing_valid_is_an_error_even_when_skipping(tmp_path):
    path = tmp_path / "all_bad.jsonl"
    path.write_text(_with(GOOD_EGO, answer=7) + "\n" + "{oops\n")
    with pytest.raises(
        FirstSightError,
        match=r"no valid egoschema samples; 2 bad record\(s\) skipped: .*all_bad.jsonl:1: answer index 7",
    ):
        FileQA(path, "egoschema", on_bad_sample="skip")


def test_a_json_list_with_a_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("[\n" + json.dumps(GOOD_EGO) + ",\n" + json.dumps(GOOD_EGO)[:-1] + "\n]\n")
    with pytest.raises(FirstSightError, match=rf"{path}:4: not valid JSON"):
        FileQA(path, "egoschema", on_bad_sample="skip")


def test_a_missing_data_file_is_named(tmp_path):
    with pytest.raises(FirstSightError, match="data file not found: .*nope.jsonl"):
        FileQA(tmp_path / "nope.jsonl", "egoschema")


def test_without_a_video_reader_a_clip_is_refused_with_the_alternatives(monkeypatch):
    import firstsight.data.files as files

    monkeypatch.setattr(files, "_video_backend", lambda: None)
    with pytest.raises(FirstSightError) as err:
        FileQA(FIXTURES / "egoschema.jsonl", "egoschema", on_bad_sample="skip")  # not a bad sample: not skipped
    message = str(err.value)
    assert "clip.mp4" in message and "list of frame images" in message and "pip install av" in message


# ------------------------------------------------------------------------------- config


def test_load_split_dispatches_on_the_data_group(monkeypatch):
    assert isinstance(load_split(compose().data, "train", 0), SyntheticEgoQA)
    monkeypatch.chdir(ROOT)  # relative data paths are from the directory run.py was started in
    cfg = compose(
        [
            "data=egoschema",
            "data.train_file=tests/fixtures/egoschema.jsonl",
            "data.validation_file=tests/fixtures/messages.json",
            "data.max_pixels=12544",
        ]
    )
    train = load_split(cfg.data, "train", 0)
    assert isinstance(train, FileQA) and len(train) == 4 and train.skipped == 0
    assert all(w * h <= 12544 for image in train[0].images for w, h in [image.size])
    # the format follows the choice: the Qwen-style file is not EgoSchema data
    with pytest.raises(FirstSightError, match="messages.json:2: no 'question'"):
        load_split(cfg.data, "validation", 0)


def _fixture_overrides(choice="egoschema", name="egoschema.jsonl"):
    path = FIXTURES / name
    return [f"data={choice}", f"data.train_file={path}", f"data.validation_file={path}"]


def test_file_data_configs_validate():
    validate(compose(_fixture_overrides()))
    validate(compose(_fixture_overrides("conversations", "conversations.jsonl") + ["data.on_bad_sample=skip"]))


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (
            ["data.train_file=nope/train.jsonl"],
            ["data.train_file='nope/train.jsonl'", "the file is missing", "nope/train.jsonl"],
        ),
        (["data.validation_file=null"], ["data.validation_file=None", "reads the validation split"]),
        (["data.format=coco"], ["data.format='coco'", "conversations", "egoschema"]),
        (["data.on_bad_sample=ignore"], ["data.on_bad_sample='ignore'", "'error', 'skip'"]),
        (["data.max_pixels=100"], ["data.max_pixels=100", ">= 784"]),
        (["data.min_pixels=50000", "data.max_pixels=40000"], ["data.max_pixels=40000", "data.min_pixels=50000"]),
        (["data.fps=0"], ["data.fps=0", "> 0"]),
        (["data.max_frames=0"], ["data.max_frames=0", ">= 1"]),
        (["data.image_root=/no/such/dir"], ["data.image_root='/no/such/dir'", "no such directory"]),
    ],
    ids=[
        "missing-file",
        "unset-file",
        "format",
        "policy",
        "max-pixels",
        "min-over-max",
        "fps",
        "max-frames",
        "image-root",
    ],
)
def test_invalid_file_data_settings_are_refused(overrides, fragments):
    with pytest.raises(ConfigError) as err:
        validate(compose(_fixture_overrides() + overrides))
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_only_the_splits_a_task_reads_are_required():
    path = FIXTURES / "egoschema.jsonl"
    validate(compose(["data=egoschema", f"data.train_file={path}", "train.eval_at_end=false"]))
    validate(compose(["data=egoschema", f"data.validation_file={path}", "task=evaluate"]))
    with pytest.raises(ConfigError, match="data.train_file=None"):
        validate(compose(["data=egoschema", f"data.validation_file={path}"]))  # distill trains on it


# ------------------------------------------------------------------------------- run.py
