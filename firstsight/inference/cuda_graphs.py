"""Recording CUDA graphs, and the one-line reason when a graph cannot be recorded (tests patch `record_graph`)."""

from __future__ import annotations

from typing import Any

import torch

WARMUP_STEPS = 3  # eager runs on a side stream before a capture (lazy inits, allocator pools)


def record_graph(step: Any, pool: Any = None) -> Any:
    """`step()` captured as a CUDA graph (whose replay() is the step), after WARMUP_STEPS eager runs
    on a side stream (lazy initialisations, the allocator's pools), as torch.cuda.graphs' docs do.
    `pool`: a memory pool shared with other graphs (torch.cuda.graph_pool_handle), else its own."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_STEPS):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        step()
    return graph


def refusal_reason(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300] if text else ''}"
