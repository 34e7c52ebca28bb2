"""The memory budget on a GPU (firstsight/core/memory.py, hardware.memory_budget_gb, hardware=edge_*):
the process is really capped (torch.cuda.set_per_process_memory_fraction), a real CUDA
out-of-memory under the cap becomes the suite's "does not fit" outcome instead of an error, and
the profile task at real size (Qwen2-VL-2B, random weights, bf16: 4.4 GB of weights) does not fit
4 GB (out of memory while loading) and fits 8 GB. The CPU tests (tests/unit/test_edge.py) inject the
exception instead.

The cap counts everything this process's allocator holds, so each test runs alone in a process of
its own (gpu_support.in_a_process_of_its_own): after the decoding tests, empty_cache() still left
1.21 GB held in the tier's process (an H100), which a 1 GB cap would have counted."""

from __future__ import annotations

import pytest
import torch
from conftest import compose
from gpu_support import (
    GPU_MARKS,
    RecordingTracker,
    assert_finite,
    in_a_process_of_its_own,
    in_own_process,
    release_cuda,
)

pytestmark = GPU_MARKS

GB = 1e9


@pytest.fixture(autouse=True)
def _uncapped():
    if not in_own_process():  # here the test only starts its own process
        yield
        return
    release_cuda()
    held = torch.cuda.memory_reserved() / GB
    assert held < 0.5, f"{held:.2f} GB of GPU memory is held before the test, in a process of its own"
    yield
    release_cuda()


@in_a_process_of_its_own
def test_an_allocation_past_the_cap_is_does_not_fit_and_one_within_it_fits():
    from firstsight.core.memory import CUDA_BASIS, DOES_NOT_FIT, FITS, apply_memory_budget, run_within_budget

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    basis, tags = apply_memory_budget(1.0, "cuda")  # 1 GB
    assert basis == CUDA_BASIS
    # the tag is written with 6 decimals: 1 GB of an H200's 141 GB is 0.006662
    assert float(tags["firstsight.edge.memory_fraction"]) == pytest.approx(GB / total, abs=5e-7)
    assert torch.cuda.get_per_process_memory_fraction() == pytest.approx(GB / total, rel=1e-5)

    def peak_gb():
        return torch.cuda.max_memory_allocated() / GB

    def allocate(n_bytes):
        def work():
            block = torch.ones(int(n_bytes), dtype=torch.uint8, device="cuda")
            return int(block[-1])  # touched on the device: a real allocation

        return work

    done, edge = run_within_budget(allocate(0.5 * GB), 1.0, basis, peak_gb, lambda: "loading")
    assert done == 1 and edge.fits, f"0.5 GB under a 1 GB cap: {edge.tags}"
    assert edge.tags["firstsight.edge.verdict"] == FITS and 0.5 <= edge.metrics["edge/peak_gb"] <= 1.0

    torch.cuda.reset_peak_memory_stats()
    done, edge = run_within_budget(allocate(2 * GB), 1.0, basis, peak_gb, lambda: "loading")
    assert done is None and not edge.fits, "2 GB under a 1 GB cap was allocated: the cap is not applied"
    assert edge.metrics["edge/fits"] == 0.0 and "edge/headroom_gb" not in edge.metrics
    assert edge.tags["firstsight.edge.verdict"] == DOES_NOT_FIT and edge.tags["firstsight.edge.oom_stage"] == "loading"
    assert "out of memory while loading under a 1 GB budget" in edge.tags["firstsight.edge.reason"]
    assert edge.metrics["edge/peak_gb"] <= 1.0

    release_cuda()  # the cap lifted: the same 2 GB is allocated, so it was the cap that refused it
    assert allocate(2 * GB)() == 1


def _profile(hardware, tmp_path, monkeypatch):
    """task=profile of the real-size student (random weights, bf16) under `hardware` (an edge_* preset),
    in this process, briefly; the metrics and tags it logged."""
    from firstsight.suite.validate import validate
    from firstsight.tasks.profile import profile

    monkeypatch.chdir(tmp_path)
    cfg = compose(
        [
            "task=profile",
            "task.target=student",
            "model=qwen2vl_7b_2b",
            "model.student.weights=random",
            "precision=bf16",
            f"hardware={hardware}",
            "task.warmup_queries=1",
            "task.latency_queries=2",
            "task.throughput_batches=1",
            "task.throughput_batch_size=1",
            "task.new_tokens=4",
            "train.progress_bar=false",
            "tracking.enabled=false",
        ]
    )
    validate(cfg)
    tracker = RecordingTracker()
    metrics = profile(cfg, tracker)
    return metrics, tracker


@in_a_process_of_its_own
def test_the_profile_at_real_size_does_not_fit_4_gb(cache_dir, tmp_path, monkeypatch):
    """bf16 Qwen2-VL-2B (4.4 GB of weights) under hardware=edge_4gb: the cap refuses it while
    loading; the run ends normally with the verdict (benchmarks/results/edge_sweep_*.md: peak 3.71 GB)."""
    metrics, tracker = _profile("edge_4gb", tmp_path, monkeypatch)
    assert metrics["edge/fits"] == 0.0, f"fits under 4 GB: {metrics}"
    assert metrics["edge/budget_gb"] == 4.0 and 0 < metrics["edge/peak_gb"] <= 4.0
    assert "infer/latency_p50_s" not in metrics, "it profiled although loading ran out of memory"
    tags = tracker.tags
    assert tags["firstsight.edge.basis"] == "cuda_allocator"
    assert tags["firstsight.edge.verdict"] == "does not fit" and tags["firstsight.edge.oom_stage"] == "loading"
    assert "out of memory while loading under a 4 GB budget" in tags["firstsight.edge.reason"]
    assert tracker.metrics["edge/fits"] == 0.0  # logged, not only returned


@in_a_process_of_its_own
def test_the_profile_at_real_size_fits_8_gb(cache_dir, tmp_path, monkeypatch):
    """The same under hardware=edge_8gb: it loads, decodes and fits (peak about 4.9 GB)."""
    metrics, tracker = _profile("edge_8gb", tmp_path, monkeypatch)
    assert metrics["edge/fits"] == 1.0, f"does not fit 8 GB: {tracker.tags.get('firstsight.edge.reason')}"
    assert tracker.tags["firstsight.edge.verdict"] == "fits"
    assert 4.4 < metrics["edge/peak_gb"] <= 8.0 and metrics["model/weights_gb"] == pytest.approx(4.42, abs=0.1)
    assert metrics["edge/headroom_gb"] == pytest.approx(8.0 - metrics["edge/peak_gb"])
    assert metrics["perf/peak_vram_gb"] == metrics["edge/peak_gb"]
    assert metrics["infer/latency_p50_s"] > 0
    assert_finite(metrics, "profile under 8 GB")
