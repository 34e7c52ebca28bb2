"""The bad-input matrix in process (run_task on the composed config): each case exits 2 with one line
naming the bad value and what is valid, and writes nothing. The matrix and where each row is tested:
unit/test_bad_input.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose, default_store_runs

from firstsight.config.specs import model_spec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GOOD_RECORD = json.loads((FIXTURES / "egoschema.jsonl").read_text().splitlines()[0])


def _refused(tmp_path, monkeypatch, capsys, overrides):
    """Run the job in this process in `tmp_path`; it must exit with status 2 before writing
    anything. Returns its `error: ...` message."""
    from firstsight.suite.dispatch import run_task

    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    cfg = compose(
        [
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "hardware.num_threads=1",
            "train.max_steps=1",
            "train.throughput_warmup_steps=0",
            *overrides,
        ]
    )  # short if not refused
    with pytest.raises(SystemExit) as stop:
        run_task(cfg)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    [message] = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no mlflow.db, no checkpoints, no metrics
    return message


# ----------------------------------------------------------------------------- config

ZERO_KD = ["identically zero", "cross-entropy alone while paying for the teacher", "distill_loss=none"]

CONFIG_CASES = {
    # out-of-range numbers not covered elsewhere
    "lora-alpha": (["lora.enabled=true", "lora.alpha=0"], ["lora.alpha=0.0", "must be > 0"]),
    "lora-dropout": (["lora.dropout=1"], ["lora.dropout=1.0", "[0, 1)"]),
    "max-steps": (["train.max_steps=0"], ["train.max_steps=0", ">= 1"]),
    "warmup-steps": (["train.warmup_steps=-1"], ["train.warmup_steps=-1", ">= 0"]),
    "threads": (["hardware.num_threads=0"], ["hardware.num_threads=0", "null or >= 1"]),
    "skew": (["distill_loss=skew_forward_kl", "distill_loss.skew=1.5"], ["distill_loss.skew=1.5", "[0, 1)"]),
    "skew-negative": (["distill_loss=skew_reverse_kl", "distill_loss.skew=-0.1"], ["distill_loss.skew=-0.1", "[0, 1)"]),
    "beta-above-1": (
        ["distill_loss=jsd", "distill_loss.beta=1.5"],
        ["distill_loss.beta=1.5", "strictly between 0 and 1"],
    ),
    # settings whose kd term is identically zero or weightless: CE alone while paying for the teacher
    "jsd-beta-0": (
        ["distill_loss=jsd", "distill_loss.beta=0"],
        ["distill_loss.beta=0.0 is invalid", *ZERO_KD, "choose beta strictly between 0 and 1"],
    ),
    "jsd-beta-1": (
        ["distill_loss=jsd", "distill_loss.beta=1"],
        ["distill_loss.beta=1.0 is invalid", *ZERO_KD, "choose beta strictly between 0 and 1"],
    ),
    "skew-forward-1": (
        ["distill_loss=skew_forward_kl", "distill_loss.skew=1"],
        ["distill_loss.skew=1.0 is invalid", *ZERO_KD, "choose skew in [0, 1)"],
    ),
    "skew-reverse-1": (
        ["distill_loss=skew_reverse_kl", "distill_loss.skew=1"],
        ["distill_loss.skew=1.0 is invalid", *ZERO_KD, "choose skew in [0, 1)"],
    ),
    "alpha-0": (
        ["distill_loss=forward_kl", "distill_loss.alpha=0"],
        [
            "distill_loss.alpha=0.0 is invalid",
            "no weight",
            "cross-entropy alone while paying for the teacher",
            "choose alpha in (0, 1]",
            "distill_loss=none",
        ],
    ),
    "resume-empty": (["train.resume=''"], ["train.resume=''", "auto, never, or the path"]),
    # unknown choices of a string setting
    "attention": (
        ["hardware.attn_implementation=xformers"],
        ["hardware.attn_implementation='xformers'", "['eager', 'sdpa', 'flash_attention_2']"],
    ),
    # contradictory combinations
    "flash-attention-on-cpu": (
        ["hardware.attn_implementation=flash_attention_2"],
        ["hardware.attn_implementation='flash_attention_2'", "use sdpa or eager on the CPU"],
    ),
    # an empty dataset (the synthetic data)
    "empty-synthetic-data": (["data.train_size=0"], ["data.train_size=0", ">= 1"]),
    "max-length": (["data.max_length=0"], ["data.max_length=0", "null (no limit) or >= 1 tokens"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_values(tmp_path, monkeypatch, capsys, case):
    overrides, fragments = CONFIG_CASES[case]
    message = _refused(tmp_path, monkeypatch, capsys, overrides)
    for fragment in fragments:
        assert fragment in message, message


def _model_dir(tmp_path, files):
    path = tmp_path / "model"
    path.mkdir()
    for name, content in files.items():
        (path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


MODEL_DIR_CASES = {
    "a-file": (
        lambda t: (t / "model.safetensors", (t / "model.safetensors").write_bytes(b"x"))[0],
        ["is a file, not a model directory", "config.json and model.safetensors"],
    ),
    "config-not-json": (
        lambda t: _model_dir(t, {"config.json": "{oops", "model.safetensors": b"x"}),
        ["config.json cannot be read as JSON", "save the model again"],
    ),
    "no-weights": (
        lambda t: _model_dir(t, {"config.json": "{}"}),
        [
            "has config.json but no weights (model.safetensors or model.safetensors.index.json)",
            "an incomplete checkpoint",
            "or set model.student.weights=random",
        ],
    ),
    "pickled-weights": (
        lambda t: _model_dir(t, {"config.json": "{}", "pytorch_model.bin": b"x"}),
        ["holds pytorch_model.bin but no model.safetensors", "never pickle files", "convert them"],
    ),
    "missing-shard": (
        lambda t: _model_dir(
            t,
            {
                "config.json": "{}",
                "model-00001-of-00002.safetensors": b"x",
                "model.safetensors.index.json": json.dumps(
                    {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
                ),
            },
        ),
        ["incomplete: 1 of the 2 weight files", "model-00002-of-00002.safetensors", "copy them again"],
    ),
}


@pytest.mark.parametrize("case", sorted(MODEL_DIR_CASES))
def test_model_directories_that_cannot_be_loaded(tmp_path, monkeypatch, capsys, case):
    make, fragments = MODEL_DIR_CASES[case]
    workdir = tmp_path / "work"
    workdir.mkdir()
    path = make(tmp_path)
    message = _refused(
        workdir,
        monkeypatch,
        capsys,
        ["task=evaluate", f"model.student.source={path}", "model.student.weights=pretrained"],
    )
    assert f"model.student.source='{path}'" in message
    for fragment in fragments:
        assert fragment in message, message


# ----------------------------------------------------------------------------- data files


def _record(**changes):
    record = dict(GOOD_RECORD, frames=[str(FIXTURES / f) for f in GOOD_RECORD["frames"]])
    record.update(changes)
    return json.dumps(record)


DATA_CASES = {
    "answer-out-of-range": (
        (_record() + "\n" + _record(answer=7) + "\n").encode(),
        [":2: answer index 7 is out of range for 5 options (0..4)", "data.on_bad_sample=skip"],
    ),
    "missing-image": (
        (_record(frames=["nowhere/frame.png"]) + "\n").encode(),
        [":1: image file not found", "nowhere/frame.png", "data.on_bad_sample=skip"],
    ),
    "empty-file": (
        b"\n\n",
        ["no records (the file is empty)", "one JSON object per line", "tests/fixtures/egoschema.jsonl"],
    ),
    "not-utf8": (
        (_record() + "\n").encode() + b'{"question": "caf\xe9"}\n',
        [":2: not UTF-8 text", "data files must be UTF-8"],
    ),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_is_refused_before_the_run_is_created(tmp_path, monkeypatch, capsys, case):
    content, fragments = DATA_CASES[case]
    data = tmp_path / "data"
    data.mkdir()
    train = data / "train.jsonl"
    train.write_bytes(content)
    workdir = tmp_path / "work"
    workdir.mkdir()
    message = _refused(
        workdir,
        monkeypatch,
        capsys,
        ["data=egoschema", f"data.train_file={train}", f"data.validation_file={FIXTURES / 'egoschema.jsonl'}"],
    )
    assert str(train) in message
    for fragment in fragments:
        assert fragment in message, message


def _long_and_short_records(tmp_path):
    """A data file of two records, the second with a longer question; and each one's length as
    QACollator batches it alone (what data.max_length counts)."""
    from firstsight.data.batching import QACollator
    from firstsight.data.files import FileQA
    from firstsight.models.loading import load_processor

    path = tmp_path / "data" / "records.jsonl"
    path.parent.mkdir()
    path.write_text(_record() + "\n" + _record(question=GOOD_RECORD["question"] + " Look closely." * 12) + "\n")
    dataset = FileQA(path, "egoschema")
    cfg = compose()
    collate = QACollator(load_processor(cfg.model, cfg.cache_dir))
    return path, [len(collate([dataset[i]])["input_ids"][0]) for i in range(len(dataset))]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading a model fails the test: what validation refuses must stop before any model."""
    import firstsight.models.loading as models

    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", load_model)


def test_a_sample_longer_than_max_length_is_refused_before_the_run(
    tmp_path, monkeypatch, capsys, cache_dir, no_model_loads
):
    path, (short, long) = _long_and_short_records(tmp_path)
    assert long > short
    workdir = tmp_path / "work"
    workdir.mkdir()
    message = _refused(
        workdir,
        monkeypatch,
        capsys,
        ["data=egoschema", f"data.train_file={path}", "train.eval_at_end=false", f"data.max_length={short}"],
    )
    assert f"error: {path}:2: the sample is {long} tokens long (" in message  # the first record is at the limit
    for fragment in [
        f"more than data.max_length={short}: raise data.max_length",
        "data.max_pixels=200704 per frame",
        "data.max_frames=8",
        "data.on_bad_sample=skip to leave bad records out",
    ]:
        assert fragment in message, message


def test_a_sample_longer_than_max_length_is_skipped_and_counted(tmp_path, monkeypatch, caplog, cache_dir):
    """data.on_bad_sample=skip: the long record is left out of the split the task reads, and counted
    in data/skipped_samples with the other bad records."""
    from firstsight.suite.dispatch import run_task

    path, (short, long) = _long_and_short_records(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = compose(
        [
            "task=evaluate",
            "data=egoschema",
            f"data.validation_file={path}",
            f"data.max_length={short}",
            "data.on_bad_sample=skip",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "hardware.num_threads=1",
            "task.max_new_tokens=2",
        ]
    )
    run_task(cfg)
    assert f"skipping a bad sample: {path}:2: the sample is {long} tokens long" in caplog.text
    [run] = default_store_runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.metrics["data/skipped_samples"] == 1
    assert run.data.metrics["eval/chance_accuracy"] == pytest.approx(1 / 5)  # the one record kept


def test_a_max_length_below_the_synthetic_samples_is_refused(tmp_path, monkeypatch, capsys, cache_dir, no_model_loads):
    """Generated samples cannot be skipped: the limit itself is refused, with the first sample over
    it, its length and the longest length, all as QACollator counts them."""
    import re

    from firstsight.data import synthetic_split
    from firstsight.data.batching import QACollator
    from firstsight.models.loading import load_processor

    message = _refused(tmp_path, monkeypatch, capsys, ["data.max_length=60", "data.train_size=40"])
    assert "error: data.max_length=60 is too small for the synthetic data" in message  # run.py adds where it was set
    index, length, longest = map(
        int,
        re.search(
            r"train sample (\d+) \(a \w+ question, \d frame\(s\) of 112x112 px\) is (\d+) tokens long .* "
            r"The longest train sample is (\d+) tokens: set data.max_length >= \3 or null",
            message,
        ).groups(),
    )
    assert "generated samples cannot be skipped" in message and "lower data.image_size or data.num_frames" in message
    cfg = compose()
    train, collate = synthetic_split(cfg.data, "train", 0), QACollator(load_processor(cfg.model, cfg.cache_dir))
    lengths = [len(collate([train[i]])["input_ids"][0]) for i in range(40)]
    assert (lengths[index], max(lengths)) == (length, longest)
    assert all(n <= 60 for n in lengths[:index]) and length > 60


# ----------------------------------------------------------------------------- weights and checkpoints


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


def _wider_config(path):
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["intermediate_size"] *= 2
    (path / "config.json").write_text(json.dumps(config))


def _drop_a_tensor(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    dropped = sorted(k for k in tensors if k.endswith("mlp.up_proj.weight"))[0]
    del tensors[dropped]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return dropped


def _loaded_name(key):
    """The model's name of a tensor save_pretrained stored as the hub's Qwen2-VL files name it
    (model.layers.*, visual.*), which transformers renames when it loads it."""
    if key.startswith("visual."):
        return "model." + key
    return key.replace("model.", "model.language_model.", 1) if key.startswith("model.") else key


def _sharded(saved_student, path):
    """The student saved as several safetensors shards with an index, one shard's tensor widened."""
    import shutil

    from safetensors.torch import load_file, save_file

    path.mkdir(parents=True)
    for name in ("config.json", "generation_config.json"):
        if (saved_student / name).is_file():
            shutil.copy(saved_student / name, path / name)
    tensors = load_file(str(saved_student / "model.safetensors"))
    language = sorted(k for k in tensors if k.startswith("model.layers."))
    shards = {
        "model-00001-of-00002.safetensors": sorted(set(tensors) - set(language)),
        "model-00002-of-00002.safetensors": language,
    }
    widened = next(k for k in shards["model-00002-of-00002.safetensors"] if k.endswith("mlp.up_proj.weight"))
    tensors[widened] = tensors[widened].repeat(2, 1)
    for shard, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(path / shard), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}})
    )
    return _loaded_name(widened), tuple(tensors[widened].shape)


def _damaged_header(path):
    raw = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(raw[:8] + b"{not json" + raw[17:])


@pytest.mark.parametrize("case", ["wider-config", "missing-tensor", "sharded", "damaged-header"])
def test_safetensors_that_do_not_match_the_config_are_refused_before_the_run(
    tmp_path, monkeypatch, capsys, saved_student, no_model_loads, case
):
    """Validation reads the safetensors headers (no tensor data) and compares names and shapes with
    the model config.json describes, built on the meta device: refused before any model is loaded or
    run created, in the words loading uses (firstsight.models.loading._weights_mismatch)."""
    path = tmp_path / "student"
    if case == "sharded":
        widened, shape = _sharded(saved_student, path)
        fragments = [
            f"the weights in {path} (model-00002-of-00002.safetensors) do not match its config.json: "
            f"1 tensor(s) of another shape ({widened} is {shape} in the file, ({shape[0] // 2}, {shape[1]}) "
            "by the config)"
        ]
    else:
        _copy(saved_student, tmp_path)
        if case == "wider-config":
            _wider_config(path)
            fragments = [
                f"the weights in {path} (model.safetensors) do not match its config.json: 6 tensor(s) of "
                "another shape (model.language_model.layers.0.mlp.down_proj.weight is (64, 128) in the "
                "file, (64, 256) by the config, ",
                ", ...)",
            ]
        elif case == "missing-tensor":
            dropped = _drop_a_tensor(path)
            fragments = [
                f"the weights in {path} (model.safetensors) do not match its config.json: 1 tensor(s) "
                f"missing ({_loaded_name(dropped)})"
            ]
        else:
            _damaged_header(path)
            fragments = [
                f"{path / 'model.safetensors'} cannot be read as safetensors (",
                "save or copy the model again",
            ]
    workdir = tmp_path / "work"
    workdir.mkdir()
    message = _refused(
        workdir,
        monkeypatch,
        capsys,
        ["task=evaluate", f"model.student.source={path}", "model.student.weights=pretrained"],
    )
    assert message.startswith(f"error: model.student.source='{path}': "), message
    for fragment in fragments + ["or set model.student.weights=random for its architecture alone"]:
        assert fragment in message, message
    if case != "damaged-header":
        assert (
            "The checkpoint is damaged or incomplete, or config.json was edited or belongs to another model" in message
        )


def test_safetensors_that_do_not_match_the_config_are_refused_when_loaded(tmp_path, monkeypatch, capsys, saved_student):
    """Loading checks again (a hub checkpoint, or a directory changed after validation): the job's
    run is created and marked FAILED with the reason; transformers alone would initialise those
    tensors at random."""
    from firstsight.suite.dispatch import run_task
    from firstsight.suite.validate import environment

    monkeypatch.setattr(environment, "_weights_problem", lambda *args: None)  # as if validation had not seen it
    wider = _copy(saved_student, tmp_path / "wider")
    _wider_config(wider)
    missing = _copy(saved_student, tmp_path / "missing")
    dropped = _drop_a_tensor(missing)
    monkeypatch.chdir(tmp_path)
    for path, fragments in [
        (wider, ["6 tensor(s) of another shape", "mlp.", "in the file, (", "by the config"]),
        (missing, ["1 tensor(s) missing", dropped]),
    ]:
        cfg = compose(
            [
                "task=evaluate",
                f"model.student.source={path}",
                "model.student.weights=pretrained",
                f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                "hardware.num_threads=1",
            ]
        )
        with pytest.raises(SystemExit) as stop:
            run_task(cfg)
        assert stop.value.code == 2
        message = capsys.readouterr().err
        assert f"the weights in {path} do not match its config.json" in message and "save the model again" in message
        for fragment in fragments:
            assert fragment in message, message
    runs = default_store_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FAILED", "FAILED"]
    assert all("do not match its config.json" in r.data.tags["firstsight.error"] for r in runs)
