"""The report task: a real sweep read back through MLflow by `python run.py task=report`, and the
pure selection / table / baseline / target logic on synthetic run records."""

from __future__ import annotations

import csv
import re

import pytest
from conftest import compose

from firstsight.evaluation.stats import FAIL, NOT_MEASURABLE, PASS, UNRESOLVED, Estimate, questions_needed
from firstsight.tasks.report import (
    ACCURACY_RULE,
    BASELINE_RULE,
    RunRecord,
    Selection,
    accuracy_verdict,
    build_table,
    find_baselines,
    fmt,
    is_baseline,
    make_plots,
    md_escape,
    md_unescape,
    over_seeds,
    render_html,
    render_markdown,
    swept_keys,
    table_csv,
    target_checks,
    teacher_quantization,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("throughput_vs_memory.png", "accuracy_vs_memory.png", "loss_curves.png")


def _md_section_table(markdown, heading):
    """The first table after `heading`: (headers, rows) with cells unescaped."""
    lines = markdown.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([md_unescape(c.strip()) for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return table[0], table[2:]


@pytest.mark.parametrize(
    "override, named",
    [
        ("task.max_runs=0", "task.max_runs=0"),
        ("task.accuracy_drop_target=5", "task.accuracy_drop_target=5.0"),
        ("task.vram_saving_target=0", "task.vram_saving_target=0.0"),
        ("task.throughput_gain_target=-1", "task.throughput_gain_target=-1.0"),
    ],
)
def test_bad_report_settings_are_refused(override, named):
    from firstsight.core.errors import ConfigError
    from firstsight.suite.validate import validate

    with pytest.raises(ConfigError, match=re.escape(named)):
        validate(compose(["task=report", override]))


# ----------------------------------------------------------------------------- pure logic


def _run(run_id, task="distill", precision="fp32", status="FINISHED", start=0, metrics=None, params=None, tags=None):
    dtype, quantization = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "nf4": ("bfloat16", "nf4")}[
        precision
    ]
    return RunRecord(
        run_id=run_id,
        status=status,
        start_time=start,
        params={
            "task.name": task,
            "precision.name": precision,
            "precision.dtype": dtype,
            "precision.quantization": quantization,
            "precision.teacher_quantization": "None",
            "lora.enabled": str(precision == "nf4"),
            "seed": "0",
            "tracking.run_name": run_id,
            **(params or {}),
        },
        metrics=dict(metrics or {}),
        tags={"firstsight.task": task, "firstsight.sweep_id": "none", **(tags or {})},
    )


def test_swept_keys_are_the_params_that_differ():
    a = _run("a" * 32, params={"distill_loss.temperature": "1.0"})
    b = _run("b" * 32, precision="bf16", params={"distill_loss.temperature": "1.0"})
    c = _run("c" * 32, task="profile", params={"task.target": "student"})
    assert swept_keys([a, b]) == ["precision.dtype", "precision.name"]  # run names (tracking.*) never count
    keys = swept_keys([a, b, c])
    assert "task.target" in keys and "distill_loss.temperature" in keys  # absent in some runs: differs
    assert "task.name" not in keys and "seed" not in keys


def test_the_teachers_architecture_is_a_column_when_a_teacher_of_another_one_is_among_the_runs():
    qwen = {"firstsight.teacher_architecture": "qwen2_vl"}
    a = _run("a" * 32, params={"model.name": "tiny"}, tags=qwen)
    b = _run("b" * 32, params={"model.name": "tiny_llava"}, tags={"firstsight.teacher_architecture": "llava_onevision"})
    table = build_table([a, b])
    assert [c.key for c in table.columns][:3] == ["run", "task", "firstsight.teacher_architecture"]
    assert table.column("firstsight.teacher_architecture") == ["qwen2_vl", "llava_onevision"]
    assert "teacher architecture" in [c.header for c in table.columns]
    same = [c.key for c in build_table([a, _run("c" * 32, precision="bf16", tags=qwen)]).columns]
    assert "firstsight.teacher_architecture" not in same  # every teacher a Qwen2-VL: nothing to tell apart
    seeds = [_run(x * 32, params={"seed": s}, tags=t) for x, s, t in (("d", "0", qwen), ("e", "1", qwen))]
    seeds += [_run("f" * 32, params={"seed": "0"}, tags={"firstsight.teacher_architecture": "llava_onevision"})]
    headers, rows = over_seeds(build_table(seeds))
    assert headers[:2] == ["task", "teacher architecture"]
    assert sorted(r[1] for r in rows) == ["llava_onevision", "qwen2_vl"]  # two settings, not one


def test_table_columns_rows_and_empty_cells():
    a = _run("a" * 32, metrics={"perf/peak_rss_gb": 1.5, "train/kd_loss": 0.25}, start=1)
    b = _run("b" * 32, precision="bf16", metrics={"perf/peak_vram_gb": 3.0}, status="FAILED", start=2)
    table = build_table([a, b])
    keys = [c.key for c in table.columns]
    assert keys == [
        "run",
        "status",
        "task",
        "precision.dtype",
        "precision.name",
        "perf/peak_vram_gb",
        "perf/peak_rss_gb",
        "train/kd_loss",
    ]
    headers = {c.key: c.header for c in table.columns}
    assert "VRAM" in headers["perf/peak_vram_gb"] and "RSS" in headers["perf/peak_rss_gb"]
    assert table.column("perf/peak_rss_gb") == [1.5, None]
    assert table.column("status") == ["FINISHED", "FAILED"]
    assert [fmt(v) for v in table.column("perf/peak_vram_gb")] == ["", "3"]
    assert "status" not in [c.key for c in build_table([a]).columns]


def _tree(*pairs):
    """Records of a sweep: (run id, precision, temperature, throughput, vram)."""
    return [
        _run(
            rid,
            precision=p,
            start=i,
            params={"distill_loss.temperature": t},
            metrics={"perf/throughput_tokens_per_s": tput, "perf/peak_vram_gb": vram},
        )
        for i, (rid, p, t, tput, vram) in enumerate(pairs)
    ]


def test_the_baseline_is_the_fp32_run_with_the_same_other_swept_values():
    runs = _tree(
        ("f1", "fp32", "1", 100.0, 10.0),
        ("f4", "fp32", "4", 120.0, 10.0),
        ("b1", "bf16", "1", 250.0, 6.0),
        ("b4", "bf16", "4", 200.0, 4.0),
        ("n4", "nf4", "4", 90.0, 3.0),
    )
    swept = swept_keys(runs)
    by_id = {r.run_id: r for r in runs}
    assert [b.run_id for b in find_baselines(by_id["b1"], runs, swept)] == ["f1"]
    assert [b.run_id for b in find_baselines(by_id["b4"], runs, swept)] == ["f4"]
    assert [b.run_id for b in find_baselines(by_id["n4"], runs, swept)] == ["f4"]  # precision and LoRA may differ
    assert find_baselines(by_id["f4"], runs, swept) == []  # a baseline is not checked
    accuracy, throughput, vram = target_checks(runs, 0.01, 2.0, 0.5)
    assert [(r.run.run_id, [b.run_id for b in r.baselines], r.ratio, r.verdict.status) for r in throughput.rows] == [
        ("b1", ["f1"], 2.5, PASS),
        ("b4", ["f4"], 200 / 120, FAIL),
        ("n4", ["f4"], 90 / 120, FAIL),
    ]
    assert throughput.rows[0].notes == [  # runs from before the code version was tagged
        "1 baseline run: repeat it for a spread",
        "code version not recorded (a run from before firstsight.code_version): like for like on device and packages only",
    ]
    assert [(r.run.run_id, r.ratio, r.passed) for r in vram.rows] == [
        ("b1", 0.6, False),
        ("b4", 0.4, True),
        ("n4", 0.3, True),
    ]
    assert accuracy.not_measurable and not accuracy.rows


def test_targets_without_a_baseline_or_vram_are_not_measurable():
    no_fp32 = _tree(("b1", "bf16", "1", 250.0, 6.0), ("n1", "nf4", "1", 90.0, 3.0))
    _, throughput, vram = target_checks(no_fp32, 0.01, 2.0, 0.5)
    assert not throughput.rows and "no full-precision baseline" in throughput.not_measurable[0]
    unmatched = _tree(("f1", "fp32", "1", 100.0, 10.0), ("b4", "bf16", "4", 250.0, 6.0))
    _, throughput, _ = target_checks(unmatched, 0.01, 2.0, 0.5)
    assert [(r.run.run_id, str(r.verdict), r.ratio) for r in throughput.rows] == [
        ("b4", "not measurable (no full-precision run with the same other swept values)", None)
    ]
    cpu = [_run("f", metrics={"perf/peak_rss_gb": 2.0}), _run("b", precision="bf16", metrics={"perf/peak_rss_gb": 1.0})]
    _, _, vram = target_checks(cpu, 0.01, 2.0, 0.5)
    assert not vram.rows and "RSS is not VRAM" in vram.not_measurable[0]


def test_an_old_run_with_a_drop_but_no_interval_is_unresolved_never_pass():
    runs = [
        _run("a", metrics={"eval/accuracy_drop": 0.005}),
        _run("b", task="evaluate", metrics={"eval/accuracy_drop": 0.02}),
        _run("s", metrics={"eval/accuracy_drop": -0.5, "eval/teacher_accuracy": 0.3, "eval/student_accuracy": 0.8}),
        _run("c", task="profile", metrics={"eval/accuracy_drop": 0.5}),
    ]
    accuracy = target_checks(runs, 0.01, 2.0, 0.5)[0]
    assert [(r.run.run_id, str(r.verdict)) for r in accuracy.rows] == [
        ("a", "unresolved (no interval: rerun with this version)"),
        ("b", "unresolved (no interval: rerun with this version)"),
        ("s", "unresolved (no interval: rerun with this version)"),
    ]
    assert accuracy.rows[2].notes == ["student above its teacher (drop -0.5)"]


def test_values_are_escaped_in_markdown_and_html(tmp_path):
    evil = "<script>alert(1)</script>|x"
    runs = [
        _run("a" * 32, params={"model.name": evil}),
        _run("b" * 32, precision="bf16", params={"model.name": "tiny"}),
    ]
    table = build_table(runs)
    assert md_unescape(md_escape(evil)) == evil
    selection = Selection(experiment="e<b>", store="s", runs=runs, scope="all")
    plots = make_plots(runs, tmp_path, {})
    assert all(p.skipped for p in plots) and not list(tmp_path.iterdir())  # no data: no picture, said so
    markdown = render_markdown(selection, table, target_checks(runs, 0.01, 2, 0.5), plots, "now")
    assert markdown.count("Not drawn:") == 3
    html = render_html(markdown, "t")
    assert "<script>" not in html and "&lt;script&gt;" in html and "e&lt;b&gt;" in html
    _, rows = _md_section_table(markdown, "## Comparison")
    assert evil in rows[0]  # one cell, the pipe kept inside it


def test_plots_are_drawn_from_the_data(tmp_path):
    runs = [
        _run(
            "a" * 32,
            metrics={
                "perf/peak_rss_gb": 1.0,
                "perf/throughput_tokens_per_s": 10.0,
                "eval/student_accuracy": 0.5,
                "train/loss": 1.0,
            },
        ),
        _run("b" * 32, precision="bf16", metrics={"perf/peak_rss_gb": 0.8, "perf/throughput_tokens_per_s": 12.0}),
    ]
    plots = make_plots(runs, tmp_path, {"a" * 32: [(1, 2.0), (2, 1.0)]})
    assert not any(p.skipped for p in plots)
    for name in PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_runs_that_differ_by_seed_are_summarised_as_mean_and_std():
    accuracies = {
        ("none", "0"): 0.10,
        ("none", "1"): 0.20,
        ("none", "2"): 0.30,
        ("forward_kl", "0"): 0.40,
        ("forward_kl", "1"): 0.40,
    }
    runs = [
        _run(
            f"{loss}{seed}" * 8,
            start=i,
            params={"distill_loss.name": loss, "seed": seed},
            metrics={"eval/student_accuracy": acc},
        )
        for i, ((loss, seed), acc) in enumerate(accuracies.items())
    ]
    headers, rows = over_seeds(build_table(runs))
    assert headers[:3] == ["task", "distill_loss.name", "seeds"]
    by_loss = {row[1]: row for row in rows}
    assert by_loss["none"][2] == "3" and by_loss["none"][3] == "0.2 ± 0.1"  # sample std of .1,.2,.3
    assert by_loss["forward_kl"][2] == "2" and by_loss["forward_kl"][3] == "0.4 ± 0"
    assert over_seeds(build_table(runs[:1] + runs[3:4])) is None  # seed not swept: no summary


# ----------------------------------------------------------------------------- verdicts that do not mislead


def _est(name, value, low, high):
    return {name: value, f"{name}_ci_low": low, f"{name}_ci_high": high}


def _judged(
    run_id,
    questions,
    drop,
    teacher=(0.6, 0.55, 0.65),
    chance=0.25,
    task="distill",
    precision="bf16",
    params=None,
    tags=None,
    **more,
):
    """A run whose accuracy drop (value, low, high) was measured on `questions` questions."""
    metrics = {
        "eval/questions": questions,
        "eval/chance_accuracy": chance,
        **_est("eval/teacher_accuracy", *teacher),
        **_est("eval/accuracy_drop", *drop),
        **more,
    }
    return _run(run_id, task=task, precision=precision, params=params, tags=tags, metrics=metrics)


def test_a_quantized_teacher_is_not_the_reference_the_full_precision_one_is():
    """INT8 teacher 0.30, student 0.295: 0.5 points below its own teacher, 16.5 below the full-precision one."""
    q = {"precision.name": "int8", "precision.dtype": "float16", "precision.quantization": "int8"}
    run = _judged(
        "q" * 32,
        5000,
        (0.005, -0.003, 0.013),
        teacher=(0.30, 0.287, 0.313),
        params=q,
        **_est("eval/student_accuracy", 0.295, 0.283, 0.308),
        **_est("eval/full_precision_teacher_accuracy", 0.46, 0.446, 0.474),
        **_est("eval/full_precision_accuracy_drop", 0.165, 0.152, 0.178),
    )
    row = accuracy_verdict(run, 0.01)
    assert str(row.verdict) == ("FAIL (+16.5 [+15.2, +17.8] points, 5000 questions: lower bound > 1)")
    assert row.value == 0.165 and row.notes == []  # the judged drop; the student is below both teachers
    plain = _judged("p" * 32, 5000, (0.002, -0.004, 0.008), precision="fp32")
    accuracy = target_checks([run, plain], 0.01, 2.0, 0.5)[0]
    markdown = render_markdown(
        Selection("e", "s", [run, plain], "all"), build_table([run, plain]), [accuracy], [], "now"
    )
    headers, rows = _md_section_table(markdown, "### Accuracy drop")
    cells = dict(zip(headers, rows[0]))
    assert (cells["teacher"], cells["teacher acc"], cells["full-precision teacher acc"]) == (
        "int8",
        "0.300 [0.287, 0.313]",
        "0.460 [0.446, 0.474]",
    )
    assert (cells["drop vs its teacher"], cells["drop vs full-precision teacher"], cells["result"]) == (
        "0.005 [-0.003, 0.013]",
        "0.165 [0.152, 0.178]",
        FAIL,
    )
    cells = dict(zip(headers, rows[1]))  # unquantized: its own teacher is the full-precision one
    assert (cells["teacher"], cells["drop vs full-precision teacher"], cells["result"]) == (
        "unquantized",
        "0.002 [-0.004, 0.008]",
        PASS,
    )
    # the same run from before the full-precision drop was logged: its own drop would pass, so it is not judged
    old = _judged("o" * 32, 5000, (0.002, -0.004, 0.008), params=q)
    assert str(accuracy_verdict(old, 0.01).verdict) == (
        "unresolved (the teacher is quantized (int8) and the run logged no drop against the full-precision "
        "teacher (eval/full_precision_accuracy_drop): rerun with this version)"
    )


@pytest.mark.parametrize(
    "params, tags, expected",
    [
        ({"precision.quantization": "int8"}, {}, "int8"),
        ({"precision.teacher_quantization": "nf4"}, {}, "nf4"),  # the teacher's own
        ({"precision.quantization": "int8", "precision.teacher_quantization": "none"}, {}, None),  # student's base only
        ({"precision.parts.language.quantization": "int8"}, {}, "int8"),  # one part
        (
            {
                "precision.quantization": "nf4",
                "precision.parts.vision.quantization": "none",
                "precision.parts.merger.quantization": "none",
            },
            {},
            "nf4",
        ),  # nf4_lm
        (
            {},
            {
                "firstsight.teacher_precision.language.quantization": "nf4",
                "firstsight.teacher_precision.vision.quantization": "none",
            },
            "nf4",
        ),  # as the run resolved it
        (
            {},
            {
                "firstsight.teacher_precision.language.quantization": "nf4",
                "firstsight.teacher_precision.vision.quantization": "int8",
            },
            "int8, nf4",
        ),  # parts quantized differently: each kind once
        (
            {},
            {
                "firstsight.teacher_precision.language.dtype": "bfloat16",
                "firstsight.teacher_precision.language.quantization": "none",
                "firstsight.precision.language.quantization": "int8",
            },
            None,
        ),  # the teacher's dtype and the student's quantization are not the teacher's quantization
        # a run from before precision.teacher_quantization existed: the teacher follows the model-wide setting
        ({"precision.teacher_quantization": None, "precision.quantization": "int8"}, {}, "int8"),
        ({"precision.teacher_quantization": None, "precision.quantization": None}, {}, None),  # neither logged
        ({"precision.teacher_quantization": "null", "precision.quantization": "int8"}, {}, "int8"),
        ({"precision.teacher_quantization": "", "precision.quantization": "int8"}, {}, "int8"),
        ({}, {}, None),
    ],
)
def test_the_teachers_quantization_is_read_from_params_or_tags(params, tags, expected):
    run = _run("t", precision="bf16", params=params, tags=tags)
    run.params = {k: v for k, v in run.params.items() if v is not None}  # None: a param the run did not log
    assert teacher_quantization(run) == expected


@pytest.mark.parametrize("intervals", [False, True])
def test_a_teacher_at_chance_makes_the_drop_not_measurable(intervals):
    """Random weights: teacher 0, student 0, drop 0 is no evidence of a small drop."""
    if intervals:
        metrics = {
            **_est("eval/teacher_accuracy", 0.0, 0.0, 0.029),
            **_est("eval/student_accuracy", 0.0, 0.0, 0.029),
            **_est("eval/accuracy_drop", 0.0, 0.0, 0.0),
            "eval/questions": 128,
        }
        teacher = "0.000 [0.000, 0.029]"
    else:
        metrics = {"eval/teacher_accuracy": 0.0, "eval/student_accuracy": 0.0, "eval/accuracy_drop": 0.0}
        teacher = "0.000"
    run = _run("r", precision="bf16", metrics={**metrics, "eval/chance_accuracy": 0.27})
    assert str(accuracy_verdict(run, 0.01).verdict) == (
        f"not measurable (the teacher ({teacher}) is not above chance (0.270): its accuracy says nothing "
        "(random or untrained weights?))"
    )


def test_too_few_questions_is_unresolved_with_how_many_would_do():
    run = _judged("u", 128, (0.005, -0.05, 0.06))
    verdict = accuracy_verdict(run, 0.01).verdict
    needed = questions_needed(Estimate(0.005, -0.05, 0.06, 128), 0.01)
    assert needed > 128
    assert verdict.status == UNRESOLVED
    assert verdict.reason == f"too few questions: need ~{needed}; +0.5 [-5.0, +6.0] points, 128 questions"


@pytest.mark.parametrize(
    "drop, status",
    [
        ((0.002, -0.004, 0.008), PASS),
        ((0.03, 0.02, 0.04), FAIL),
        ((0.005, 0.0, 0.01), PASS),  # upper bound exactly the target
        ((0.02, 0.01, 0.03), UNRESOLVED),  # lower bound exactly the target: not above it
        ((-0.01, -0.02, 0.0), PASS),
        # bounds that are the target up to float rounding (0.46 - 0.45 = 0.010000000000000009), as a
        # drop taken between two accuracies is: on the same side as the target itself
        ((0.005, 0.0, 0.46 - 0.45), PASS),
        ((0.02, 0.46 - 0.45, 0.03), UNRESOLVED),
    ],
)
def test_the_verdict_reads_the_interval_against_the_target(drop, status):
    assert accuracy_verdict(_judged("v", 5000, drop), 0.01).verdict.status == status


def test_an_interval_of_no_width_is_widened_by_the_rule_of_three():
    """Teacher and student answer alike on every question: the bootstrap has nothing to resample and
    gives [0, 0]; 0 discordant questions of 128 still allows a drop of up to ~3/128."""
    assert accuracy_verdict(_judged("d", 128, (0.0, 0.0, 0.0)), 0.01).verdict.status == UNRESOLVED
    assert accuracy_verdict(_judged("d", 1000, (0.0, 0.0, 0.0)), 0.01).verdict.status == PASS
    assert accuracy_verdict(_judged("d", 128, (1.0, 1.0, 1.0)), 0.01).verdict.status == FAIL


def test_a_student_above_its_teacher_is_said_and_judged_by_the_rule():
    above = accuracy_verdict(_judged("a", 5000, (-0.03, -0.045, -0.015)), 0.01)
    assert above.verdict.status == PASS
    assert above.notes == ["student above its teacher (drop -0.030 [-0.045, -0.015])"]
    unsure = accuracy_verdict(_judged("b", 128, (-0.02, -0.08, 0.04)), 0.01)
    assert unsure.verdict.status == UNRESOLVED
    assert unsure.notes == ["student above its teacher (drop -0.020 [-0.080, 0.040])"]
    below = accuracy_verdict(_judged("c", 5000, (0.002, -0.004, 0.008)), 0.01)
    assert below.notes == []


def test_a_model_whose_blind_accuracy_is_inside_its_interval_is_flagged():
    run = _judged(
        "f" * 32,
        128,
        (0.005, -0.05, 0.06),
        **_est("eval/student_accuracy", 0.461, 0.378, 0.546),
        **{"eval/student_blind_accuracy": 0.45, "eval/teacher_blind_accuracy": 0.2},
    )
    looking = _judged(
        "g" * 32,
        128,
        (0.005, -0.05, 0.06),
        **_est("eval/student_accuracy", 0.461, 0.378, 0.546),
        **{"eval/student_blind_accuracy": 0.25},
    )
    flag = "student not looking at the frames: blind 0.450 within its interval [0.378, 0.546]"
    assert accuracy_verdict(run, 0.01).flags == [flag]  # the teacher (0.6 [0.55, 0.65], blind 0.2) is looking
    assert accuracy_verdict(looking, 0.01).flags == []
    at_chance = _judged(
        "h" * 32,
        128,
        (0.005, -0.05, 0.06),
        chance=0.4,
        **_est("eval/student_accuracy", 0.461, 0.378, 0.546),
        **{"eval/student_blind_accuracy": 0.45},
    )
    assert accuracy_verdict(at_chance, 0.01).flags == []  # not above chance by its interval: it uses nothing
    runs = [run, looking]
    markdown = render_markdown(
        Selection("e", "s", runs, "all"), build_table(runs), target_checks(runs, 0.01, 2.0, 0.5), [], "now"
    )
    headers, rows = _md_section_table(markdown, "### Accuracy drop")
    assert [dict(zip(headers, r))["note"] for r in rows] == [flag, ""]
    assert f"\n- Run {'f' * 8}: {flag}\n" in md_unescape(markdown)  # a line of its own, below the table
    # the comparison table shows accuracies with their intervals
    headers, rows = _md_section_table(markdown, "## Comparison")
    cells = dict(zip(headers, rows[0]))
    assert (cells["student acc"], cells["student blind acc"]) == ("0.461 [0.378, 0.546]", "0.45")
    table = list(csv.DictReader(table_csv(build_table(runs)).splitlines()))
    assert (table[0]["eval/student_accuracy"], table[0]["eval/student_accuracy_ci_low"]) == ("0.461", "0.378")


def test_a_blind_accuracy_on_its_interval_s_bound_is_flagged_for_either_model():
    """Inside the interval includes its bounds; a model whose interval's lower bound is at chance
    is not above chance, so its blind accuracy says nothing."""
    run = _judged(
        "f" * 32,
        128,
        (0.005, -0.05, 0.06),
        **_est("eval/student_accuracy", 0.461, 0.378, 0.546),
        **{"eval/teacher_blind_accuracy": 0.55, "eval/student_blind_accuracy": 0.546},
    )
    assert accuracy_verdict(run, 0.01).flags == [
        "teacher not looking at the frames: blind 0.550 within its interval [0.550, 0.650]",
        "student not looking at the frames: blind 0.546 within its interval [0.378, 0.546]",
    ]
    at_chance = _judged(
        "h" * 32,
        128,
        (0.005, -0.05, 0.06),
        chance=0.378,
        **_est("eval/student_accuracy", 0.461, 0.378, 0.546),
        **{"eval/student_blind_accuracy": 0.45},
    )
    assert accuracy_verdict(at_chance, 0.01).flags == []


def test_a_student_above_a_quantized_teacher_is_said_against_each_teacher():
    q = {"precision.name": "int8", "precision.dtype": "float16", "precision.quantization": "int8"}
    fp_teacher = _est("eval/full_precision_teacher_accuracy", 0.46, 0.446, 0.474)
    above_both = _judged(
        "q" * 32,
        5000,
        (-0.01, -0.02, 0.0),
        teacher=(0.30, 0.287, 0.313),
        params=q,
        **fp_teacher,
        **_est("eval/full_precision_accuracy_drop", -0.005, -0.012, 0.002),
    )
    assert accuracy_verdict(above_both, 0.01).notes == [
        "student above its quantized teacher (drop -0.010 [-0.020, 0.000])",
        "student above the full-precision teacher (drop -0.005 [-0.012, 0.002])",
    ]
    level = _judged(
        "l" * 32,
        5000,
        (0.0, -0.006, 0.006),
        teacher=(0.30, 0.287, 0.313),
        params=q,
        **fp_teacher,
        **_est("eval/full_precision_accuracy_drop", 0.0, -0.006, 0.006),
    )
    assert accuracy_verdict(level, 0.01).notes == []  # a drop of exactly 0 is not above
    # an unquantized teacher is the full-precision one (the run logs the same drop twice): said once
    plain = _judged(
        "p" * 32,
        5000,
        (-0.03, -0.045, -0.015),
        precision="fp32",
        **_est("eval/full_precision_accuracy_drop", -0.03, -0.045, -0.015),
    )
    assert accuracy_verdict(plain, 0.01).notes == ["student above its teacher (drop -0.030 [-0.045, -0.015])"]


def test_a_quantized_teacher_at_chance_does_not_stop_the_verdict_against_the_full_precision_one():
    """The drop judged is against the full-precision teacher: that teacher must be above chance, not
    the quantized one the run distilled from."""
    run = _judged(
        "q" * 32,
        5000,
        (0.3, 0.28, 0.32),
        teacher=(0.25, 0.238, 0.262),
        chance=0.25,
        params={"precision.name": "int8", "precision.dtype": "float16", "precision.quantization": "int8"},
        **_est("eval/full_precision_teacher_accuracy", 0.46, 0.446, 0.474),
        **_est("eval/full_precision_accuracy_drop", 0.002, -0.004, 0.008),
    )
    assert accuracy_verdict(run, 0.01).verdict.status == PASS


@pytest.mark.parametrize(
    "metrics, teacher",
    [
        # the teacher's interval reaches down to chance: not measurable before the drop's interval is read
        ({**_est("eval/teacher_accuracy", 0.3, 0.2, 0.4), "eval/accuracy_drop": 0.01}, "0.300 [0.200, 0.400]"),
        ({"eval/teacher_accuracy": 0.25, **_est("eval/accuracy_drop", 0.0, -0.004, 0.004)}, "0.250"),  # at chance
    ],
)
def test_a_teacher_not_above_chance_makes_the_drop_not_measurable_whatever_the_drop(metrics, teacher):
    run = _run("r", precision="bf16", metrics={**metrics, "eval/questions": 5000, "eval/chance_accuracy": 0.25})
    assert str(accuracy_verdict(run, 0.01).verdict) == (
        f"not measurable (the teacher ({teacher}) is not above chance (0.250): its accuracy says nothing "
        "(random or untrained weights?))"
    )


def test_a_drop_with_an_interval_but_no_question_count_is_unresolved():
    run = _judged("n", 5000, (0.002, -0.004, 0.008))
    del run.metrics["eval/questions"]
    assert str(accuracy_verdict(run, 0.01).verdict) == (
        "unresolved (no question count (eval/questions): rerun with this version)"
    )


@pytest.mark.parametrize(
    "questions, verdict",
    [
        (300, "PASS (+0.0 [-1.0, +1.0] points, 300 questions: upper bound ≤ 1)"),  # ± 3/300: exactly the target
        (1, "unresolved (too few questions: need ~"),  # one question: ± 3, not [0, 0]
    ],
)
def test_the_rule_of_three_widens_to_exactly_3_over_the_question_count(questions, verdict):
    assert str(accuracy_verdict(_judged("d", questions, (0.0, 0.0, 0.0)), 0.01).verdict).startswith(verdict)


def _speed(
    run_id, precision, throughput, start=0, device="NVIDIA H100 80GB HBM3", torch="2.6.0", code="abc", params=None
):
    return _run(
        run_id,
        precision=precision,
        start=start,
        params=params,
        metrics={"perf/throughput_tokens_per_s": throughput},
        tags={
            "firstsight.device_name": device,
            "version.torch": torch,
            "version.firstsight": "0.1.0",
            "firstsight.code_version": code,
        },
    )


@pytest.mark.parametrize(
    "baseline, reason",
    [
        (dict(device="NVIDIA H200"), "baseline f1 on NVIDIA H200, this run on NVIDIA H100 80GB HBM3"),
        (dict(torch="2.5.1"), "baseline f1 ran other package versions (torch 2.5.1 vs 2.6.0: baseline vs this run)"),
        (dict(code="def+dirty"), "baseline f1 ran code version def+dirty, this run abc"),
    ],
)
def test_speed_is_compared_like_for_like_only(baseline, reason):
    runs = [_speed("f1", "fp32", 100.0, **baseline), _speed("b1", "bf16", 210.0, start=1)]
    throughput = target_checks(runs, 0.01, 2.0, 0.5)[1]
    assert [(r.run.run_id, str(r.verdict), r.ratio) for r in throughput.rows] == [
        ("b1", f"not measurable (no like-for-like baseline: {reason})", None)
    ]
    # a like-for-like baseline beside it is used, and only it
    runs.append(_speed("f2", "fp32", 150.0, start=2))
    row = target_checks(runs, 0.01, 2.0, 0.5)[1].rows[0]
    assert ([b.run_id for b in row.baselines], row.ratio, row.verdict.status) == (["f2"], 210.0 / 150.0, FAIL)
    assert row.notes == ["1 baseline run: repeat it for a spread", f"not like for like, left out: {reason}"]


def test_several_baselines_are_judged_by_their_median_with_the_spread_shown():
    """Three fp32 repeats give 1.61×, 1.85× or 2.06× for the same bf16 run; the most recent (2.06×) decides nothing."""
    value = 1000.0
    runs = [
        _speed("f161", "fp32", value / 1.61, start=0),
        _speed("f185", "fp32", value / 1.85, start=1),
        _speed("f206", "fp32", value / 2.06, start=2),
        _speed("b16", "bf16", value, start=3),
    ]
    throughput = target_checks(runs, 0.01, 2.0, 0.5)[1]
    (row,) = throughput.rows
    assert row.ratio == pytest.approx(1.85) and row.verdict.status == FAIL
    assert row.verdict.reason == "1.850× the median of 3 baseline values, not ≥ 2×"
    markdown = render_markdown(Selection("e", "s", runs, "all"), build_table(runs), [throughput], [], "now")
    headers, rows = _md_section_table(markdown, "### Training throughput gain")
    cells = dict(zip(headers, rows[0]))
    assert (cells["baseline runs"], cells["baselines"], cells["baseline median"], cells["baseline min–max"]) == (
        "f161, f185, f206",
        "3",
        fmt(value / 1.85),
        f"{fmt(value / 2.06)}–{fmt(value / 1.61)}",
    )
    assert (cells["ratio"], cells["ratio min–max"], cells["result"]) == ("1.850×", "1.610–2.060×", FAIL)
    assert cells["note"] == "the ratios to single baselines (1.610–2.060×) straddle the target"


def test_an_fp32_lora_run_is_no_baseline_of_full_fine_tuning():
    lora = _speed("fl", "fp32", 150.0, params={"lora.enabled": "True"})
    pure_bf16 = _speed("fp", "fp32", 140.0, params={"precision.trainable_dtype": "bfloat16"})
    full = _speed("ff", "fp32", 100.0, start=1)
    bf16 = _speed("bb", "bf16", 250.0, start=2)
    assert not is_baseline(lora) and not is_baseline(pure_bf16) and is_baseline(full)
    runs = [lora, pure_bf16, full, bf16]
    swept = swept_keys(runs)
    assert [b.run_id for b in find_baselines(bf16, runs, swept)] == ["ff"]
    assert [b.run_id for b in find_baselines(lora, runs, swept)] == ["ff"]  # LoRA is compared, as compressed
    throughput = target_checks([lora, bf16], 0.01, 2.0, 0.5)[1]
    assert throughput.not_measurable == [
        "no full-precision baseline run with perf/throughput_tokens_per_s here (add precision=fp32 to the sweep)"
    ]


def test_a_ratio_exactly_at_its_target_passes():
    """Throughput ≥ 2× the baseline's and VRAM ≤ 0.5× of it: a ratio of exactly 2 or 0.5 meets the
    target; the smallest step past it does not."""
    runs = _tree(
        ("f1", "fp32", "1", 100.0, 10.0),
        ("b1", "bf16", "1", 200.0, 5.0),  # exactly at both targets
        ("n1", "nf4", "1", 199.99, 5.001),  # just short of both
    )
    _, throughput, vram = target_checks(runs, 0.01, 2.0, 0.5)
    assert [(r.run.run_id, r.ratio, r.verdict.status) for r in throughput.rows] == [
        ("b1", 2.0, PASS),
        ("n1", 1.9999, FAIL),
    ]
    assert throughput.rows[0].verdict.reason == "2.000× the median of 1 baseline value ≥ 2×"
    assert [(r.run.run_id, r.ratio, r.verdict.status) for r in vram.rows] == [("b1", 0.5, PASS), ("n1", 0.5001, FAIL)]
    assert vram.rows[0].verdict.reason == "0.500× the median of 1 baseline value ≤ 0.5×"


def _vram(run_id, precision, vram, task="distill", start=0):
    return _run(run_id, task=task, precision=precision, start=start, metrics={"perf/peak_vram_gb": vram})


@pytest.mark.parametrize(
    "runs, throughput_why, vram_why",
    [
        (
            [],
            "no distill run here has perf/throughput_tokens_per_s",
            "no run here has perf/peak_vram_gb: they ran on the CPU, where peak resident memory "
            "(perf/peak_rss_gb) is measured instead; RSS is not VRAM, so the VRAM target is not judged "
            "(RSS is in the table)",
        ),
        (  # VRAM measured by an evaluate run only: no run of the checked tasks
            [_vram("e", "bf16", 3.0, task="evaluate")],
            "no distill run here has perf/throughput_tokens_per_s",
            "no distill or profile run here has perf/peak_vram_gb",
        ),
        (
            _tree(("f1", "fp32", "1", 100.0, 10.0), ("f4", "fp32", "4", 120.0, 10.0)),
            "every run with this metric is a baseline (full-precision) run: nothing compressed to compare",
            "every run with this metric is a baseline (full-precision) run: nothing compressed to compare",
        ),
    ],
)
def test_each_check_states_its_target_and_why_it_was_not_measurable(runs, throughput_why, vram_why):
    checks = target_checks(runs, 0.01, 2.0, 0.5)
    assert [c.metric for c in checks] == ["eval/accuracy_drop", "perf/throughput_tokens_per_s", "perf/peak_vram_gb"]
    markdown = md_unescape(render_markdown(Selection("e", "s", runs, "all"), build_table(runs), checks, [], "now"))
    for heading, why in [
        (
            "### Accuracy drop: teacher − student accuracy ≤ 0.01 (= 1 percentage point), the full-precision "
            "teacher's, by the 95 % interval",
            "no distill or evaluate run here has eval/accuracy_drop "
            "(distill with train.eval_at_end=true, or task=evaluate, logs it)",
        ),
        ("### Training throughput gain: ≥ 2× the baseline's perf/throughput_tokens_per_s", throughput_why),
        ("### VRAM saving: ≤ 0.5× the baseline's perf/peak_vram_gb", vram_why),
    ]:
        assert f"{heading}\n\n- Not measurable: {why}\n" in markdown


def test_an_accuracy_target_of_several_points_is_stated_in_points():
    assert target_checks([], 0.025, 2.0, 0.5)[0].target_text == (
        "teacher − student accuracy ≤ 0.025 (= 2.5 percentage points), the full-precision teacher's, "
        "by the 95 % interval"
    )


def test_the_vram_of_profile_runs_is_judged_their_throughput_is_not():
    """profile measures memory like distill does, but trains nothing: no training throughput."""
    runs = [_vram("f", "fp32", 0.8, task="profile"), _vram("b", "bf16", 0.4, task="profile", start=1)]
    for run in runs:
        run.metrics["perf/throughput_tokens_per_s"] = 100.0
    _, throughput, vram = target_checks(runs, 0.01, 2.0, 0.5)
    assert throughput.not_measurable == ["no distill run here has perf/throughput_tokens_per_s"]
    assert [(r.run.run_id, r.ratio, str(r.verdict)) for r in vram.rows] == [
        ("b", 0.5, "PASS (0.500× the median of 1 baseline value ≤ 0.5×)")  # a baseline below 1 GB is a baseline
    ]


def test_a_baseline_without_a_positive_value_makes_the_ratio_not_measurable():
    """A baseline that logged 0 or nan (a failed measurement) gives no ratio; it is named."""
    runs = [_vram("f1" * 8, "fp32", 0.0), _vram("f2" * 8, "fp32", float("nan"), start=1)]
    runs.append(_vram("b", "bf16", 4.0, start=2))
    (row,) = target_checks(runs, 0.01, 2.0, 0.5)[2].rows
    assert (row.ratio, str(row.verdict)) == (
        None,
        "not measurable (baseline f1f1f1f1 has perf/peak_vram_gb=0.0; baseline f2f2f2f2 has perf/peak_vram_gb=nan)",
    )


def test_every_baseline_left_out_is_named():
    on_h200 = [_speed(f"f{i}", "fp32", 100.0, start=i, device="NVIDIA H200") for i in (1, 2)]
    bf16 = _speed("b1", "bf16", 210.0, start=3)
    reasons = [f"baseline f{i} on NVIDIA H200, this run on NVIDIA H100 80GB HBM3" for i in (1, 2)]
    (row,) = target_checks([*on_h200, bf16], 0.01, 2.0, 0.5)[1].rows
    assert str(row.verdict) == f"not measurable (no like-for-like baseline: {reasons[0]}; {reasons[1]})"
    like = [_speed(f"f{i}", "fp32", 100.0, start=i) for i in (3, 4)]
    (row,) = target_checks([*on_h200, *like, bf16], 0.01, 2.0, 0.5)[1].rows
    assert str(row.verdict) == "PASS (2.100× the median of 2 baseline values ≥ 2×)"
    assert row.notes == [f"not like for like, left out: {reasons[0]}; {reasons[1]}"]


@pytest.mark.parametrize(
    "task, params, baseline",
    [
        ("distill", {}, True),
        ("distill", {"lora.enabled": "True"}, False),  # an fp32 LoRA run
        ("distill", {"precision.teacher_quantization": "nf4"}, False),
        ("distill", {"precision.quantization": "int8"}, False),
        ("distill", {"precision.parts.vision.dtype": "bfloat16"}, False),
        ("distill", {"precision.parts.language.quantization": "nf4"}, False),
        ("distill", {"precision.parts.vision.dtype": "float32", "precision.parts.merger.quantization": "none"}, True),
        ("distill", {"precision.trainable_dtype": "bfloat16"}, False),  # pure bf16 training
        ("profile", {"precision.trainable_dtype": "bfloat16"}, True),  # nothing is trained
        ("profile", {"lora.enabled": "True"}, False),
    ],
)
def test_which_fp32_run_is_a_baseline(task, params, baseline):
    run = _run("r", task=task, params=params)
    assert run.params["precision.dtype"] == "float32"
    assert is_baseline(run) is baseline
    # as the only fp32 run beside a bf16 one: the bf16 run is compared with it, or has no baseline
    other = _run("b", task=task, precision="bf16", params={"lora.enabled": "False"})
    assert [b.run_id for b in find_baselines(other, [run, other], swept_keys([run, other]))] == (
        ["r"] if baseline else []
    )


def test_the_report_states_its_rules_and_counts_every_verdict():
    runs = [
        _judged("p" * 32, 5000, (0.002, -0.004, 0.008)),
        _judged("f" * 32, 5000, (0.03, 0.02, 0.04)),
        _judged("u" * 32, 128, (0.005, -0.05, 0.06)),
        _judged("n" * 32, 128, (0.0, 0.0, 0.0), teacher=(0.1, 0.05, 0.2)),
        _run("o" * 32, metrics={"eval/accuracy_drop": 0.0}),
    ]
    checks = target_checks(runs, 0.01, 2.0, 0.5)
    markdown = render_markdown(Selection("e", "s", runs, "all"), build_table(runs), checks, [], "now")
    assert ACCURACY_RULE in markdown and BASELINE_RULE in markdown
    assert (
        "In all: 1 PASS, 1 FAIL, 2 unresolved, 1 not measurable (one per run and check); "
        "2 of 3 checks not measurable at all."
    ) in markdown
    headers, rows = _md_section_table(markdown, "### Accuracy drop")
    assert [dict(zip(headers, r))["result"] for r in rows] == [PASS, FAIL, UNRESOLVED, NOT_MEASURABLE, UNRESOLVED]
