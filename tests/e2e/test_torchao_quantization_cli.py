"""torchao quantization (precision=int8_weight_only, fp8): what is stored, what it computes, what is refused."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fp8_is_refused_on_the_cpu(run_cli, tmp_path):
    result = run_cli("task=profile", "precision=fp8", "hardware=cpu")
    assert result.returncode == 2
    assert "precision.quantization='fp8'" in result.stderr and "['cuda']" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "mlflow.db").exists()


def test_torchao_weights_are_refused_under_lora(run_cli, tmp_path):
    result = run_cli("precision=int8_weight_only", "lora.enabled=true")
    assert result.returncode == 2
    assert "int8_weight_only" in result.stderr and "nf4" in result.stderr and "LoRA" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()
