"""Every combination of the config groups composes; types and choices are enforced by Hydra;
ranges, combinations and backends by firstsight.suite.validate, before anything is built."""

from __future__ import annotations

import itertools

import pytest
from conftest import CONF_DIR, compose
from omegaconf import OmegaConf

from firstsight.core.errors import ConfigError
from firstsight.suite.validate import validate

GROUPS = ["model", "precision", "distill_loss", "hardware", "data", "task"]
CHOICES = {g: sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml")) for g in GROUPS}


def test_the_groups_users_asked_for_have_their_choices():
    assert {"tiny", "qwen2vl_7b_2b"} <= set(CHOICES["model"])
    assert {"fp32", "bf16", "fp16", "int8", "nf4", "int8_lm", "nf4_lm"} <= set(CHOICES["precision"])
    assert {"forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "none"} <= set(
        CHOICES["distill_loss"]
    )
    assert {"cpu", "gpu", "edge_4gb", "edge_8gb", "edge_16gb"} <= set(CHOICES["hardware"])


def all_pairs(choices):
    """Combinations (one choice per group) in which every pair of choices of two different groups
    occurs at least once: a greedy covering array, a few dozen instead of the full product."""
    uncovered = {
        ((i, a), (j, b))
        for i, j in itertools.combinations(range(len(choices)), 2)
        for a in choices[i]
        for b in choices[j]
    }
    picked = []
    while uncovered:
        best = max(
            itertools.product(*choices),
            key=lambda combo: sum(
                ((i, combo[i]), (j, combo[j])) in uncovered for i, j in itertools.combinations(range(len(combo)), 2)
            ),
        )
        picked.append(best)
        uncovered -= {((i, best[i]), (j, best[j])) for i, j in itertools.combinations(range(len(best)), 2)}
    return picked


COMBINATIONS = all_pairs([CHOICES[g] for g in GROUPS])


def test_the_combinations_cover_every_pair_of_choices():
    full = list(itertools.product(*(CHOICES[g] for g in GROUPS)))
    assert len(COMBINATIONS) < len(full) / 10
    for i, j in itertools.combinations(range(len(GROUPS)), 2):
        assert {(c[i], c[j]) for c in COMBINATIONS} == set(itertools.product(CHOICES[GROUPS[i]], CHOICES[GROUPS[j]]))


@pytest.mark.parametrize("combo", COMBINATIONS, ids=lambda c: ",".join(c))
def test_every_pair_of_choices_composes(combo):
    cfg = compose([f"{g}={c}" for g, c in zip(GROUPS, combo)])
    for group, choice in zip(GROUPS, combo):
        assert cfg[group].name == choice
    # every value resolves and has its schema's type
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert container["precision"]["dtype"] in ("float32", "bfloat16", "float16")
    assert isinstance(container["hardware"]["batch_size"], int)
    assert container["distill_loss"]["_target_"].startswith("firstsight.losses.")


def test_default_choices():
    cfg = compose()
    assert [cfg[g].name for g in GROUPS] == ["tiny", "fp32", "forward_kl", "cpu", "synthetic", "distill"]
    validate(cfg)  # the default is valid on this machine


def test_jsd_has_beta_and_kl_does_not():
    assert compose(["distill_loss=jsd"]).distill_loss.beta == 0.5
    assert "beta" not in compose(["distill_loss=forward_kl"]).distill_loss


def test_overrides_reach_the_config():
    cfg = compose(
        ["distill_loss.alpha=0.5", "hardware.batch_size=8", "train.max_steps=20", "distill_loss.temperature=4"]
    )
    assert (cfg.distill_loss.alpha, cfg.hardware.batch_size, cfg.train.max_steps) == (0.5, 8, 20)
    assert cfg.distill_loss.temperature == 4.0


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("hardware.batch_size=abc", "could not be converted to Integer"),
        ("precision.dtype=float8", "expected one of [float32, bfloat16, float16]"),
        ("train.bogus=1", "Key 'bogus' not in 'TrainConfig'"),
    ],
)
def test_wrong_types_and_keys_fail_at_composition(override, fragment):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose([override])
    assert fragment in str(err.value.__cause__) or fragment in str(err.value)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["hardware.batch_size=-1"], "hardware.batch_size=-1"),
        (["hardware.grad_accum_steps=0"], "hardware.grad_accum_steps=0"),
        (["distill_loss.temperature=0"], "distill_loss.temperature=0.0"),
        (["distill_loss.alpha=1.5"], "distill_loss.alpha=1.5"),
        (["distill_loss=jsd", "distill_loss.beta=-0.1"], "distill_loss.beta=-0.1"),
        (["train.lr=0"], "train.lr=0.0"),
        (["data.kinds=[colour_at,weather]"], "data.kinds='weather'"),
        (["hardware=gpu"], "no CUDA GPU is visible"),
        (["hardware.num_gpus=2"], "hardware.num_gpus=2"),
        (["model.student.source=/does/not/exist"], "no such directory"),
        (["model=qwen2vl_7b_2b"], "hub is offline"),
        (["model.teacher.tiny.num_heads=3"], "model.teacher.tiny.num_heads=3"),
        (["task=profile", "hardware.memory_budget_gb=0"], "hardware.memory_budget_gb=0.0"),
        (["precision.parts.language.quantization=nf4"], "precision.parts.language.quantization=nf4"),
    ],
)
def test_invalid_values_are_refused_with_the_value_and_what_is_valid(overrides, fragment):
    cfg = compose(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert fragment in message
    assert any(word in message for word in ("must", "choose", "Choose", "use", "Give", "needs"))


def test_a_quantization_whose_backend_is_missing_is_refused(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without it
    for choice in ("int8", "nf4"):
        with pytest.raises(ConfigError) as err:
            validate(compose([f"precision={choice}"]))
        assert f"precision.quantization={choice}" in str(err.value)
        assert "bitsandbytes" in str(err.value) and "precision=fp32, bf16 or fp16" in str(err.value)


def test_random_weights_of_a_known_architecture_need_no_download():
    cfg = compose(["model=qwen2vl_7b_2b", "model.teacher.weights=random", "model.student.weights=random"])
    validate(cfg)


def test_known_architectures_match_the_published_sizes():
    """Parameter counts of the embedded configs, computed on the meta device (no memory)."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from firstsight.models.architectures import known_config

    for source, billions in [("Qwen/Qwen2-VL-2B-Instruct", 2.21), ("Qwen/Qwen2-VL-7B-Instruct", 8.29)]:
        with torch.device("meta"):
            model = Qwen2VLForConditionalGeneration(known_config(source))
        assert model.num_parameters() / 1e9 == pytest.approx(billions, abs=0.01)


def test_the_kd_vs_ce_preset_sweeps_every_loss_over_three_seeds():
    cfg = compose(["experiment=kd_vs_ce"])
    params = compose(["experiment=kd_vs_ce"], return_hydra_config=True).hydra.sweeper.params
    assert set(params.distill_loss.split(",")) == set(CHOICES["distill_loss"])  # the control and every KD loss
    assert params.seed.split(",") == ["1", "2", "3"]
    assert cfg.train.max_steps >= 100 and cfg.model.name == "tiny"
    validate(cfg)


def test_the_lean_kd_preset_sets_the_measured_settings():
    cfg = compose(["experiment=lean_kd", "model=qwen2vl_7b_2b"])
    assert cfg.hardware.name == "gpu" and cfg.precision.name == "bf16"
    assert cfg.precision.trainable_dtype.value == "bfloat16"
    assert cfg.teacher_cache.enabled and cfg.teacher_cache.top_k is None
    assert cfg.hardware.compile and cfg.hardware.compile_memory_budget == 0.2
    # the rest stays overridable
    assert compose(["experiment=lean_kd", "train.optimizer=adamw_8bit"]).train.optimizer == "adamw_8bit"
