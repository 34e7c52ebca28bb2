"""Edge deployment: per-part precision (vision tower, merger, language model) resolved on the real
Qwen2-VL classes and applied to the tiny pair; its validation; memory budgets (the verdict, an
injected out-of-memory, a CPU profile under a budget); the report's edge view."""

from __future__ import annotations

import math
import sys

import pytest
from conftest import compose
from omegaconf import open_dict

from firstsight.config.specs import model_spec
from firstsight.core.errors import ConfigError
from firstsight.suite.validate import validate

QUANTIZED_CLASSES = {"int8": "Linear8bitLt", "nf4": "Linear4bit"}


# ----------------------------------------------------------------------------- part names


@pytest.mark.parametrize("source", ["Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct", "tiny"])
def test_part_names_resolve_on_the_real_qwen2vl_classes(source, cache_dir):
    """Every part names modules that exist, every weight belongs to exactly one part, and the vision
    part's bitsandbytes patterns cover model.visual's children but the merger."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from firstsight.models.architectures import known_config
    from firstsight.models.parts import PART_MODULES, UNQUANTIZED_PATTERNS, check_part_modules, part_bytes, part_of

    if source == "tiny":
        from firstsight.models.tiny import tiny_model_config, tiny_processor

        config = tiny_model_config(compose().model.teacher.tiny, tiny_processor(cache_dir).tokenizer)
    else:
        config = known_config(source)
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    check_part_modules(model)
    names = {name for name, _ in model.named_modules()}
    for covered, left in PART_MODULES.values():
        assert set(covered + left) <= names
    visual_children = {f"model.visual.{n}" for n, _ in model.model.visual.named_children()}
    with_weights = {c for c in visual_children if any(True for _ in model.get_submodule(c).parameters())}
    assert with_weights - {"model.visual.merger"} <= set(UNQUANTIZED_PATTERNS["vision"])
    assert {part_of(n) for n, _ in model.named_parameters()} == {"vision", "merger", "language"}
    assert part_of("model.visual.blocks.0.attn.qkv.weight") == "vision"
    assert part_of("model.visual.merger.mlp.0.weight") == "merger"
    assert part_of("lm_head.weight") == part_of("model.language_model.embed_tokens.weight") == "language"
    sizes = part_bytes(model)
    assert sizes["other"] == 0 and all(sizes[p] > 0 for p in ("vision", "merger", "language"))
    assert sum(sizes.values()) == model.get_memory_footprint()


# ----------------------------------------------------------------------------- the tiny pair


def _kinds_and_dtypes(model):
    """Per part: the classes of its linear layers and the dtypes of its floating-point parameters."""
    from firstsight.models.parts import part_of

    kinds, dtypes = {}, {}
    for name, module in model.named_modules():
        if type(module).__name__ in ("Linear", "Linear8bitLt", "Linear4bit") and name != "lm_head":
            kinds.setdefault(part_of(name), set()).add(type(module).__name__)
    for name, param in model.named_parameters():
        if param.is_floating_point():
            dtypes.setdefault(part_of(name), set()).add(str(param.dtype).replace("torch.", ""))
    return kinds, dtypes


@pytest.mark.parametrize(
    "overrides, expect",
    [
        (
            ["precision=int8_lm"],
            {"vision": ("bfloat16", "none"), "merger": ("bfloat16", "none"), "language": ("float16", "int8")},
        ),
        (
            ["precision=nf4_lm"],
            {"vision": ("bfloat16", "none"), "merger": ("bfloat16", "none"), "language": ("bfloat16", "nf4")},
        ),
        (
            ["precision=nf4"],
            {"vision": ("bfloat16", "nf4"), "merger": ("bfloat16", "nf4"), "language": ("bfloat16", "nf4")},
        ),
        (
            ["precision=bf16", "precision.parts.vision.dtype=float32", "precision.parts.merger.dtype=float16"],
            {"vision": ("float32", "none"), "merger": ("float16", "none"), "language": ("bfloat16", "none")},
        ),
    ],
    ids=["int8_lm", "nf4_lm", "nf4-every-part", "dtype-per-part"],
)
def test_per_part_precision_on_the_tiny_teacher(cache_dir, overrides, expect):
    import torch

    from firstsight.data import load_split
    from firstsight.data.batching import PromptCollator
    from firstsight.models.loading import load_model, load_processor

    cfg = compose(["task=profile", "task.target=teacher", *overrides])
    validate(cfg)
    processor = load_processor(cfg.model, cfg.cache_dir)
    loaded = load_model(model_spec(cfg), "teacher", processor, "cpu", frozen=True)
    model = loaded.model
    assert {p: (r.dtype, r.quantization) for p, r in loaded.parts.items()} == expect
    kinds, dtypes = _kinds_and_dtypes(model)
    for part, (dtype, quantization) in expect.items():
        assert kinds[part] == {QUANTIZED_CLASSES.get(quantization, "Linear")}, part
        assert dtypes[part] == {dtype}, part  # the unquantized weights (norms, biases, embeddings) too
    assert type(model.lm_head).__name__ == "Linear"  # the output head is never quantized
    # measured per part: the parts add up to the whole footprint
    assert sum(loaded.part_weights_gb.values()) == pytest.approx(loaded.weights_gb, rel=1e-9)
    # a mixed model runs: greedy answers to two questions
    samples = load_split(cfg.data, "validation", 0)
    batch = PromptCollator(processor)([samples[i] for i in range(2)])
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
        )
    assert out.shape[1] == batch["input_ids"].shape[1] + 2


def test_unquantized_parts_weigh_more_than_quantized_ones(cache_dir):
    """nf4 quantizes the vision tower and the merger too; nf4_lm leaves them in bf16."""
    from firstsight.models.loading import load_model, load_processor

    sizes = {}
    for precision in ("nf4", "nf4_lm"):
        cfg = compose(["task=profile", "task.target=teacher", f"precision={precision}"])
        loaded = load_model(model_spec(cfg), "teacher", load_processor(cfg.model, cfg.cache_dir), "cpu", frozen=True)
        sizes[precision] = loaded.part_weights_gb
    assert sizes["nf4"]["language"] == pytest.approx(sizes["nf4_lm"]["language"])
    assert sizes["nf4"]["vision"] < 0.6 * sizes["nf4_lm"]["vision"]  # the patch embedding (a Conv3d) stays bf16
    assert sizes["nf4"]["merger"] < 0.5 * sizes["nf4_lm"]["merger"]


# ----------------------------------------------------------------------------- validation


def _refused(overrides, *fragments, edit=None):
    cfg = compose(overrides)
    if edit is not None:
        edit(cfg)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_a_part_name_that_matches_no_module_is_refused():
    _refused(
        ["+precision.parts.vison.dtype=bfloat16"],
        "precision.parts.vison names no part",
        "vision (model.visual without model.visual.merger; LLaVA-OneVision: model.vision_tower)",
        "merger (model.visual.merger; LLaVA-OneVision: model.multi_modal_projector)",
        "language (model.language_model and lm_head)",
    )

    def from_a_file(cfg):  # as a precision preset with a misspelt part would compose
        with open_dict(cfg):
            cfg.precision.parts["visual"] = {"dtype": "bfloat16", "quantization": None}

    _refused([], "precision.parts.visual", "choose among vision", edit=from_a_file)
    _refused(["+precision.parts.vision.dtpe=float16"], "precision.parts.vision.dtpe", "dtype and quantization")


def test_quantizing_a_part_of_a_student_trained_in_full_is_refused():
    _refused(
        ["precision.parts.language.quantization=int8"],
        "precision.parts.language.quantization=int8",
        "task=distill trains in full",
        "lora.enabled=true",
    )
    validate(compose(["precision.parts.language.quantization=nf4", "lora.enabled=true"]))  # QLoRA on that part
    validate(compose(["precision=int8_lm"]))  # model-wide int8: the teacher's frozen weights only
    validate(compose(["task=profile", "precision.parts.language.quantization=int8"]))  # nothing trains


def test_one_model_has_one_bitsandbytes_kind():
    _refused(
        ["task=profile", "precision=nf4", "precision.parts.vision.quantization=int8"],
        "precision.parts.vision.quantization=int8",
        "vision=int8, merger=nf4, language=nf4",
        "choose nf4 or none for vision",
    )


def test_a_part_quantization_whose_backend_is_missing_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without it
    _refused(
        ["task=profile", "precision.parts.language.quantization=nf4"],
        "precision.parts.language.quantization=nf4",
        "bitsandbytes",
        "set precision.parts.language.quantization=none",
    )


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["task=profile", "hardware.memory_budget_gb=0"], ["hardware.memory_budget_gb=0.0", "positive number of GB"]),
        (["task=profile", "hardware.memory_budget_gb=-2"], ["hardware.memory_budget_gb=-2.0"]),
        (["task=profile", "hardware.memory_budget_gb=nan"], ["hardware.memory_budget_gb=nan"]),
        (["hardware.memory_budget_gb=4"], ["judged by task=profile", "task=distill"]),
        (["task=profile", "hardware=edge_4gb"], ["no CUDA GPU is visible"]),
    ],
)
def test_bad_budgets_are_refused(overrides, fragments):
    _refused(overrides, *fragments)


def test_the_edge_presets_cap_one_gpu_at_batch_1():
    for budget in (4, 8, 16):
        hw = compose([f"hardware=edge_{budget}gb"]).hardware
        assert (hw.memory_budget_gb, hw.device.value, hw.num_gpus, hw.batch_size) == (budget, "cuda", 1, 1)
    validate(compose(["task=profile", "hardware.memory_budget_gb=2.5"]))  # a budget on the CPU: judged by RSS


# ----------------------------------------------------------------------------- the verdict


def test_the_verdict_compares_the_measured_peak_with_the_budget():
    from firstsight.core.memory import CPU_BASIS, CUDA_BASIS, budget_fraction, verdict

    fits = verdict(4.0, 3.25, CUDA_BASIS)
    assert fits.fits and fits.metrics == {
        "edge/budget_gb": 4.0,
        "edge/peak_gb": 3.25,
        "edge/headroom_gb": 0.75,
        "edge/fits": 1.0,
    }
    assert fits.tags["firstsight.edge.basis"] == "cuda_allocator" and fits.tags["firstsight.edge.verdict"] == "fits"
    over = verdict(1.0, 1.5, CPU_BASIS)
    assert not over.fits and over.metrics["edge/fits"] == 0.0 and over.metrics["edge/headroom_gb"] == -0.5
    assert (
        over.tags["firstsight.edge.basis"] == "cpu_rss"
        and "peak RSS 1.500 GB > budget 1 GB" in over.tags["firstsight.edge.reason"]
    )
    assert verdict(2.0, 2.0, CPU_BASIS).fits  # exactly at the budget fits
    assert budget_fraction(8.0, 80 * 10**9) == pytest.approx(0.1)
    for bad in (0.0, -1.0, math.inf, 81.0):
        with pytest.raises(Exception, match="hardware.memory_budget_gb"):
            budget_fraction(bad, 80 * 10**9)


def test_an_out_of_memory_under_a_cuda_cap_is_the_result_does_not_fit():
    import torch

    from firstsight.core.memory import CPU_BASIS, CUDA_BASIS, run_within_budget

    def load():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    result, edge = run_within_budget(load, 4.0, CUDA_BASIS, lambda: 3.9, lambda: "loading")
    assert result is None and not edge.fits
    assert edge.metrics == {"edge/budget_gb": 4.0, "edge/peak_gb": 3.9, "edge/fits": 0.0}  # no headroom
    assert (
        edge.tags["firstsight.edge.verdict"] == "does not fit" and edge.tags["firstsight.edge.oom_stage"] == "loading"
    )
    assert "out of memory while loading" in edge.tags["firstsight.edge.reason"]
    assert "Tried to allocate 2.00 GiB" in edge.tags["firstsight.edge.reason"]

    def cublas():
        raise RuntimeError("CUDA error: out of memory")

    assert not run_within_budget(cublas, 4.0, CUDA_BASIS, lambda: 1.0)[1].fits
    ok, edge = run_within_budget(lambda: "measured", 4.0, CUDA_BASIS, lambda: 1.0)
    assert ok == "measured" and edge.fits

    def bug():
        raise ValueError("bug")

    with pytest.raises(ValueError):  # any other error is a bug, not a verdict
        run_within_budget(bug, 4.0, CUDA_BASIS, lambda: 1.0)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # on a CPU no cap was set: the machine's limit, not the budget
        run_within_budget(load, 4.0, CPU_BASIS, lambda: 1.0)


def test_the_pareto_front():
    from firstsight.tasks.report import pareto_front

    # (accuracy ↑, memory ↓, latency ↓)
    points = [(0.5, 2.0, 1.0), (0.6, 3.0, 1.0), (0.5, 2.5, 1.0), (0.4, 1.0, 2.0), (0.6, 3.0, 1.0)]
    assert pareto_front(points, [True, False, False]) == [True, True, False, True, True]  # equal points: both
    assert pareto_front([(1.0,), (2.0,)], [False]) == [True, False]
    assert pareto_front([], [True]) == []


def _record(run_id, precision, budget, start, metrics, task="profile", model="qwen2vl_7b_2b", tags=None):
    from firstsight.tasks.report import RunRecord

    params = {
        "task.name": task,
        "precision.name": precision,
        "precision.dtype": "bfloat16",
        "precision.quantization": "nf4" if "nf4" in precision else "none",
        "model.name": model,
        "hardware.memory_budget_gb": str(budget),
        "hardware.name": f"edge_{budget}gb" if budget else "cpu",
    }
    return RunRecord(
        run_id=run_id,
        start_time=start,
        params=params,
        metrics=metrics,
        tags={"firstsight.task": task, "firstsight.sweep_id": "none", **(tags or {})},
    )


def _edge_metrics(budget, peak, latency=None, fits=None):
    metrics = {
        "edge/budget_gb": float(budget),
        "edge/peak_gb": peak,
        "edge/fits": float(peak <= budget if fits is None else fits),
    }
    if latency is not None:
        metrics.update({"edge/headroom_gb": budget - peak, "infer/latency_p50_s": latency})
    return metrics


OOM_TAGS = {"firstsight.edge.oom_stage": "loading", "firstsight.edge.basis": "cuda_allocator"}


def _sweep():
    """precision × budget on the real-size student, and the accuracy side from evaluate runs on tiny."""
    return [
        _record("bf16-4", "bf16", 4, 1, _edge_metrics(4, 3.9, fits=0), tags=OOM_TAGS),
        _record("int8lm-4", "int8_lm", 4, 2, _edge_metrics(4, 3.5, 1.40)),
        _record("nf4lm-4", "nf4_lm", 4, 3, _edge_metrics(4, 3.0, 1.00)),
        _record("nf4-4", "nf4", 4, 4, _edge_metrics(4, 2.0, 1.10)),
        _record("bf16-8", "bf16", 8, 5, _edge_metrics(8, 5.0, 0.90)),
        _record("nf4-8", "nf4", 8, 6, _edge_metrics(8, 2.0, 1.10)),
        _record("eval-bf16", "bf16", "None", 7, {"eval/student_accuracy": 0.40}, task="evaluate", model="tiny"),
        _record("eval-nf4lm", "nf4_lm", "None", 8, {"eval/student_accuracy": 0.38}, task="evaluate", model="tiny"),
        _record("eval-nf4", "nf4", "None", 9, {"eval/student_accuracy": 0.30}, task="evaluate", model="tiny"),
    ]


def test_the_edge_view_of_a_precision_by_budget_sweep():
    from firstsight.tasks.report import edge_view

    view = edge_view(_sweep())
    rows = {r.run.run_id: r for r in view.rows}
    assert list(rows) == ["nf4-4", "nf4lm-4", "int8lm-4", "bf16-4", "nf4-8", "bf16-8"]  # by budget, fitting by peak
    assert not rows["bf16-4"].fits and rows["bf16-4"].note == "out of memory while loading"
    assert not rows["bf16-4"].on_front  # only configurations that fit are on a front
    assert rows["nf4-4"].accuracy == 0.30 and rows["nf4-4"].accuracy_from.startswith("evaluate run eval-nf4 ")
    assert rows["int8lm-4"].accuracy is None  # no evaluate run of int8_lm
    # 4 GB: int8_lm has no accuracy, so its front is on memory and latency: nf4 (least memory), nf4_lm (fastest)
    assert view.objectives[4.0] == ["peak memory", "latency p50"]
    assert {r for r in rows if rows[r].on_front and rows[r].budget == 4.0} == {"nf4-4", "nf4lm-4"}
    # 8 GB: all three objectives; bf16 is more accurate and faster, nf4 smaller: both on the front
    assert view.objectives[8.0] == ["accuracy", "peak memory", "latency p50"]
    assert rows["bf16-8"].on_front and rows["nf4-8"].on_front
    assert {r.config for r in view.rows} == {"bf16", "int8_lm", "nf4_lm", "nf4"}  # the budget is not the label
    assert edge_view([_record("x", "bf16", 4, 1, {"infer/latency_p50_s": 1.0})]) is None  # no edge runs: no view
