"""benchmarks/proxy_study.py: its statistics on outcomes whose answer is known, and its --smoke run
(the whole pipeline on the CPU: pre-training, distill runs, per-question outcomes, quantized
students, results files). What it measured on a GPU is in benchmarks/results/proxy_study_*.md."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import ROOT, compose

sys.path.insert(0, str(ROOT / "benchmarks"))
import proxy_study  # noqa: E402  (benchmarks/ is no package)


def test_outcomes_pack_and_unpack():
    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 9, 5000):
        right = [bool(x) for x in rng.random(n) < 0.4]
        assert proxy_study.unpack(proxy_study.pack(right), n) == right


def fake_study(shares, n=3000, seeds=(1, 2, 3), quantized_flips=None):
    """Per-question outcomes with known accuracies: each model's share of the questions right,
    nested so that a more accurate model is right wherever a less accurate one is (KD's gain over
    CE is then exactly the difference of their shares)."""
    quantized_flips = quantized_flips or {}
    rng = np.random.default_rng(1)
    points = []
    for seed in seeds:
        order = rng.permutation(n)
        models = {}
        for key, share in shares.items():
            right = np.zeros(n, dtype=bool)
            right[order[: int(share * n)]] = True
            models[key] = {"outcomes": proxy_study.pack(right), "accuracy": right.mean(), "weights_gb": 1.0}
        kd = np.array(proxy_study.unpack(models["kd"]["outcomes"], n))
        for precision in ("bf16", "int8"):
            right = kd.copy()
            right[order[: int(quantized_flips.get(precision, 0) * n)]] = False  # those right lose their answer
            models[f"kd@{precision}"] = {
                "outcomes": proxy_study.pack(right),
                "accuracy": right.mean(),
                "weights_gb": 1.0,
            }
        points.append({"seed": seed, "n": n, "chance": 0.25, "kinds": ["count"] * n, "models": models})
    return {"seeds": points, "losses": ["none", "kd"], "precisions": ["bf16", "int8"]}


def test_kd_closing_most_of_the_gap_significantly_is_met():
    a = proxy_study.analyse(fake_study({"teacher": 0.90, "base": 0.40, "none": 0.50, "kd": 0.82}))
    c = a["kd_vs_ce"]["kd"]
    assert c["gain"]["value"] == pytest.approx(0.32, abs=1e-3) and c["gap"]["value"] == pytest.approx(0.40, abs=1e-3)
    assert c["closed_share"] == pytest.approx(0.8, abs=0.01) and c["half_gap_margin"]["low"] > 0
    assert c["mcnemar_p"] < 1e-6 and a["best_kd"] == {"loss": "kd", "verdict": "MET"}
    assert a["accuracy"]["teacher"]["over_seeds"]["mean"] == pytest.approx(0.90, abs=1e-3)


def test_kd_closing_a_quarter_of_the_gap_misses_even_when_significant():
    a = proxy_study.analyse(fake_study({"teacher": 0.90, "base": 0.40, "none": 0.50, "kd": 0.60}))
    c = a["kd_vs_ce"]["kd"]
    assert c["mcnemar_p"] < 1e-6 and c["closed_share"] == pytest.approx(0.25, abs=0.01)
    assert c["half_gap_margin"]["high"] < 0 and a["best_kd"]["verdict"] == "MISSED"


def test_quantized_drop_verdicts_read_the_paired_interval():
    kept = proxy_study.analyse(fake_study({"teacher": 0.9, "base": 0.4, "none": 0.5, "kd": 0.7}))
    assert kept["quantized"]["int8"]["drop"]["value"] == 0 and kept["quantized"]["int8"]["verdict"].startswith("PASS")
    lost = proxy_study.analyse(
        fake_study({"teacher": 0.9, "base": 0.4, "none": 0.5, "kd": 0.7}, quantized_flips={"int8": 0.05})
    )
    assert lost["quantized"]["int8"]["drop"]["low"] > 0.01 and lost["quantized"]["int8"]["verdict"].startswith("FAIL")


def test_a_seed_without_every_loss_is_left_out():
    data = fake_study({"teacher": 0.9, "base": 0.4, "none": 0.5, "kd": 0.7})
    del data["seeds"][2]["models"]["none"]  # as a worker stopped at the time budget
    a = proxy_study.analyse(data)
    assert a["seeds"] == [1, 2] and a["seeds_left_out"] == [3]


def test_the_gpu_preset_keeps_the_study_s_proportions():
    """experiment=proxy_study: the harder split with every temporal kind, >= 5000 validation
    questions, a student of <= 1/4 of the teacher's parameters from a pre-trained base, and tiny
    widths that bitsandbytes' int8/nf4 kernels take (multiples of 64)."""
    from transformers import Qwen2VLForConditionalGeneration

    from firstsight.data.synthetic import TEMPORAL_KINDS
    from firstsight.models.tiny import tiny_model_config, tiny_processor

    cfg = compose(["experiment=proxy_study"])
    assert cfg.hardware.name == "gpu" and cfg.data.validation_size >= 5000 and cfg.data.num_frames >= 3
    assert set(TEMPORAL_KINDS) <= set(cfg.data.kinds)
    assert cfg.model.student.weights.value == "pretrained" and 0 < cfg.model.student.tiny.pretrain_steps
    assert cfg.model.student.tiny.pretrain_steps < cfg.model.teacher.tiny.pretrain_steps
    tokenizer = tiny_processor(cfg.cache_dir).tokenizer
    params = {}
    for role in ("teacher", "student"):
        tiny = cfg.model[role].tiny
        assert all(getattr(tiny, key) % 64 == 0 for key in ("hidden_size", "intermediate_size", "vision_embed_dim"))
        model = Qwen2VLForConditionalGeneration._from_config(tiny_model_config(tiny, tokenizer))
        params[role] = sum(p.numel() for p in model.parameters())
    assert params["student"] <= params["teacher"] / 4
    sweep = compose(["experiment=proxy_study"], return_hydra_config=True).hydra.sweeper.params
    assert sweep["seed"] == "1,2,3,4,5" and sweep["distill_loss"].split(",")[0] == "none"
