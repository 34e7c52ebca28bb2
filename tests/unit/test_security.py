"""Security defaults: offline by default, no code from checkpoints unless asked for,
weights only as safetensors (no pickle), servers on 127.0.0.1, and tokens from the environment
never logged."""

from __future__ import annotations

import ast

import pytest
from conftest import ROOT, compose, default_store_runs

from firstsight.config.record import config_record
from firstsight.config.specs import model_spec, tracking_spec

PACKAGE = ROOT / "firstsight"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _calls(tree: ast.AST):
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_the_default_job_asks_no_hub():
    cfg = compose()
    assert (cfg.model.teacher.source, cfg.model.student.source) == ("tiny", "tiny")


def test_trust_remote_code_is_off_unless_set_and_reaches_every_loader(tmp_path, monkeypatch):
    import transformers

    import firstsight.models.loading as models
    from firstsight.core.errors import FirstSightError

    assert compose().model.trust_remote_code is False
    seen = {}

    def recorder(name):
        def from_pretrained(*args, **kwargs):
            seen[name] = kwargs
            raise OSError("recorded; not loading anything")

        return from_pretrained

    monkeypatch.setattr(transformers.Qwen2VLForConditionalGeneration, "from_pretrained", recorder("model"))
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", recorder("processor"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recorder("tokenizer"))
    for asked in ([], ["model.trust_remote_code=true"]):
        expected = bool(asked)
        cfg = compose(
            [
                f"model.student.source={tmp_path}",
                "model.student.weights=pretrained",
                f"model.teacher.source={tmp_path / 'teacher'}",
                *asked,
            ]
        )
        seen.clear()
        with pytest.raises(FirstSightError):
            models.load_model(model_spec(cfg), "student", None, "cpu", frozen=True)
        with pytest.raises(FirstSightError):
            models.load_processor(cfg.model, cfg.cache_dir)
        with pytest.raises(FirstSightError, match="could not load the tokenizer of model.teacher.source"):
            models.check_same_tokenizer(cfg.model, None)
        assert {name: kwargs["trust_remote_code"] for name, kwargs in seen.items()} == {
            "model": expected,
            "processor": expected,
            "tokenizer": expected,
        }
        assert seen["model"]["use_safetensors"] is True  # never a pickled .bin


def test_no_source_turns_remote_code_on_by_itself():
    for path in SOURCES:
        for call in _calls(ast.parse(path.read_text(), str(path))):
            value = _keyword(call, "trust_remote_code")
            assert not (isinstance(value, ast.Constant) and value.value is True), f"{path}:{call.lineno}"


def test_torch_load_is_only_called_with_weights_only():
    found = []
    for path in SOURCES:
        for call in _calls(ast.parse(path.read_text(), str(path))):
            func = call.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "load"
                and isinstance(func.value, ast.Name)
                and func.value.id == "torch"
            ):
                value = _keyword(call, "weights_only")
                assert isinstance(value, ast.Constant) and value.value is True, (
                    f"{path}:{call.lineno}: {ast.unparse(call)}"
                )
                found.append(f"{path.name}:{call.lineno}")
    assert found  # the resumable checkpoint's optimizer state (firstsight/training/resume.py)


def test_nothing_unpickles():
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                names = []
            for name in names:
                assert name.split(".")[0] not in ("pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib"), (
                    f"{path}:{node.lineno} imports {name}"
                )
        for call in _calls(tree):
            value = _keyword(call, "allow_pickle")
            assert not (isinstance(value, ast.Constant) and value.value is True), f"{path}:{call.lineno}"


def test_the_tracking_server_binds_loopback_by_default():
    from firstsight.tracking.server import LOOPBACK, parse_args, server_command

    args = parse_args([])
    assert args.host == "127.0.0.1" and args.host in LOOPBACK
    command = server_command(args)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert "--allowed-hosts" not in command  # only widened when asked to bind other interfaces


SECRETS = {
    "HF_TOKEN": "hf_SECRET_hub_token",
    "HUGGING_FACE_HUB_TOKEN": "hf_SECRET_old_name",
    "MLFLOW_TRACKING_TOKEN": "SECRET-tracking-token",
    "MLFLOW_TRACKING_USERNAME": "SECRET-user",
    "MLFLOW_TRACKING_PASSWORD": "SECRET-password",
}


def test_tokens_in_the_environment_are_never_logged(tmp_path, monkeypatch):
    import json

    from firstsight.tasks.distill import run_record
    from firstsight.tracking.tracker import flatten_config, job_tracker

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    cfg = compose([f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    with job_tracker(tracking_spec(cfg)) as tracker:
        record = run_record(cfg, tracker, {"train/loss": 1.0})
    [run] = default_store_runs(tmp_path)
    logged = [
        json.dumps(run.data.params),
        json.dumps(run.data.tags),
        record,
        json.dumps(flatten_config(config_record(cfg))),
    ]
    [config_yaml] = list((tmp_path / "mlruns").rglob("config.yaml"))
    logged.append(config_yaml.read_text())
    assert "precision:" in logged[-1] and len(run.data.params) > 50  # what was logged is the config
    for text in logged:
        assert "SECRET" not in text


def test_no_config_reads_a_secret_from_the_environment():
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        text = path.read_text()
        for marker in ("oc.env:",):
            for chunk in text.split(marker)[1:]:
                name = chunk.split(",")[0].split("}")[0].upper()
                assert not any(word in name for word in ("TOKEN", "PASSWORD", "SECRET", "KEY")), f"{path}: {name}"
