"""Runtime facts a job needs everywhere: the device, dtypes by name, the hub's offline mode and cache, the device's name."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # the section's type only: config sits above core
    from firstsight.config.schema import HardwareConfig


def torch_dtype(name: Any) -> Any:
    import torch  # deferred: the preflight (validate, dispatch) stays torch-free

    return getattr(torch, name.value if hasattr(name, "value") else str(name))


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def device_type(hardware: HardwareConfig) -> str:
    """The device the job will run on; 'auto' resolves to cuda only when a GPU is visible."""
    device = hardware.device.value if hasattr(hardware.device, "value") else str(hardware.device)
    if device != "auto":
        return device
    import torch  # deferred: the preflight (validate, dispatch) stays torch-free

    return "cuda" if torch.cuda.is_available() else "cpu"


def in_hub_cache(repo_id: str, revision: Optional[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache  # deferred: the preflight (validate, dispatch) stays torch-free

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return isinstance(found, str)


def device_name(device_type: str) -> str:
    if device_type == "cuda":
        import torch  # deferred: the preflight (validate, dispatch) stays torch-free

        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
