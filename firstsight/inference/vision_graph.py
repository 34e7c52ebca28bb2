"""The Qwen2-VL vision encoder replayed as a CUDA graph during the prefill of static decoding.

At batch 1 the prefill is bound by the host. Everything the encoder computes from the frame grid
alone (rotary positions, frame boundaries) is computed once per grid and handed in through
transformers' precomputed-kwargs hook; the rest (patch embedding, blocks, merger) has fixed shapes
per grid and is captured once as a CUDA graph, then replayed with the pixels copied in.

Only on CUDA, frames only, at most `max_patches` patches, SDPA or eager attention; a capture is
checked once against the encoder run eagerly, and any failure turns graphs off (`off` says why).
Design notes: docs/design/vision_graph.md; measured: docs/decisions/0002-static-decoding.md,
benchmarks/HISTORY.md (host-side work).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

from firstsight.inference import cuda_graphs as capture  # patched as a module attribute in tests

log = logging.getLogger(__name__)

MAX_PATCHES = 4096  # four 448x448 frames; beyond this the encoder is GPU-bound and a graph buys nothing


class VisionGraphs:
    """One model's captured vision encoders, one per (frame grid, pixel shape, dtype)."""

    def __init__(self, max_patches: int = MAX_PATCHES):
        self.max_patches = max_patches
        self.off: Optional[str] = None  # why the encoder is no longer captured (after a failure)
        self.capture_seconds: List[float] = []
        self._graphs: Dict[Tuple, _VisionGraph] = {}

    @contextlib.contextmanager
    def serving(self, model: Any, batch: Dict[str, Any]) -> Iterator[None]:
        """Within the block, the model's vision encoder answers this batch's frames from a graph
        (captured on first use) when it can; otherwise the block changes nothing."""
        graph = self.prepare(model, batch)
        if graph is None:
            yield
            return
        visual = model.model.visual
        visual.forward = graph.forward  # an instance attribute: module __call__ finds it before the class's
        try:
            yield
        finally:
            del visual.forward

    def prepare(self, model: Any, batch: Dict[str, Any]) -> Optional[_VisionGraph]:
        """The graph for this batch's frames, captured now if it is not yet (None where no graph is
        used); the profile task calls it before anything is timed."""
        visual = getattr(getattr(model, "model", None), "visual", None)
        key = self._key(model, visual, batch)
        if key is None:
            return None
        graph = self._graphs.get(key)
        return graph if graph is not None else self._capture(visual, key, batch)

    def _key(self, model: Any, visual: Any, batch: Dict[str, Any]) -> Optional[Tuple]:
        pixels, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
        if self.off is not None or visual is None or pixels is None or grid is None:
            return None
        if batch.get("pixel_values_videos") is not None or not getattr(pixels, "is_cuda", False):
            return None
        if pixels.shape[0] > self.max_patches:
            return None
        attention = getattr(model.config, "_attn_implementation", None) or ""
        if attention not in ("sdpa", "eager"):
            return None
        return (tuple(tuple(row) for row in grid.tolist()), tuple(pixels.shape), visual.dtype)

    def _capture(self, visual: Any, key: Tuple, batch: Dict[str, Any]) -> Optional[_VisionGraph]:
        start = time.perf_counter()
        try:
            graph = _VisionGraph(visual, key, batch["pixel_values"])
        except Exception as err:  # noqa: BLE001 - any failure: the encoder runs eagerly from now on
            self.off = capture.refusal_reason(err)
            log.warning(
                "generation: capturing the vision encoder as a CUDA graph failed (%s); it runs eagerly", self.off
            )
            return None
        self._graphs[key] = graph
        seconds = time.perf_counter() - start
        self.capture_seconds.append(seconds)
        log.info(
            "generation: captured the vision encoder as a CUDA graph (%d frames, %d patches) in %.2f s",
            len(key[0]),
            key[1][0],
            seconds,
        )
        return graph


def precomputed(visual: Any, grid: Any, device: Any) -> Dict[str, Any]:
    """What the encoder computes from the frame grid alone, in the form its precomputed-kwargs hook
    takes: the patches' rotary positions on the device, the frames' boundaries on the host."""
    host_grid = grid.cpu()
    return {
        "position_ids": get_vision_position_ids(host_grid, visual.spatial_merge_size).to(device),
        "cu_seqlens": get_vision_cu_seqlens(host_grid),
    }


class _VisionGraph:
    """The encoder for one grid: an input buffer, the precomputed grid tensors, a CUDA graph."""

    def __init__(self, visual: Any, key: Tuple, pixels: Any):
        self.visual = visual
        self.grid = torch.tensor(key[0], dtype=torch.long, device=pixels.device)
        self.kwargs = precomputed(visual, self.grid, pixels.device)
        self.pixels = torch.zeros(key[1], dtype=key[2], device=pixels.device)
        self.outputs: Any = None
        self.pixels.copy_(pixels)
        self.graph = capture.record_graph(self._run)
        self.graph.replay()
        with torch.no_grad():
            eager = type(visual).forward(visual, pixels.to(key[2]), grid_thw=self.grid).pooler_output
        torch.cuda.synchronize()
        error = float((self.outputs.pooler_output.float() - eager.float()).norm() / eager.float().norm())
        if not error < 1e-2:  # also catches NaN
            raise RuntimeError(
                f"one replay of the captured vision encoder disagrees with it run eagerly (relative error {error:.3g})"
            )

    def _run(self) -> None:
        with torch.no_grad():  # the kwargs dict is consumed (popped) by the encoder: a fresh copy each time
            self.outputs = type(self.visual).forward(self.visual, self.pixels, grid_thw=self.grid, **dict(self.kwargs))

    def forward(self, pixel_values: Any, grid_thw: Any = None, **kwargs: Any) -> Any:
        """The encoder's output for `pixel_values` (of the captured grid): a replay."""
        self.pixels.copy_(pixel_values)
        self.graph.replay()
        out = self.outputs
        return type(out)(last_hidden_state=out.last_hidden_state.clone(), pooler_output=out.pooler_output.clone())
