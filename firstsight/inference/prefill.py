"""The prompt's forward (prefill) of static decoding (firstsight/inference/generation.py), taken apart so that
the host never waits for the GPU, and the language model's part replayed as a CUDA graph.

Transformers' Qwen2-VL forward, the same operations in the same order, except: host copies of the
batch's small integer tensors are taken before anything is queued; while the GPU runs the
embeddings and the vision encoder (firstsight/inference/vision_graph.py), the host computes the positions
(firstsight/models/positions.py) and checks image tokens against features by shape (no read-back); the
language model and the head on the last position are replayed as a CUDA graph per prompt shape
(LanguageGraphs, up to `max_tokens`).

The logits are those of the model's own forward (tests/unit/test_prefill.py: equal on the tiny pair).
Batches with videos, and models without these parts, go through the model's own forward.
Design notes: docs/design/prefill.md; measured: docs/decisions/0002-static-decoding.md.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple

import torch

from firstsight.inference import cuda_graphs as capture  # patched as a module attribute in tests
from firstsight.models.positions import host_inputs, prompt_positions

log = logging.getLogger(__name__)

# prompts (batch x length) up to this are replayed as graphs. At batch 1 (275 tokens) the eager prefill
# is bound by the host (a graph: 1.09x the whole answer on an H200); at batch 32 (9504 tokens) it is
# GPU-bound and a graph bought 1.01x (host_work.py --parts prefill_graph), for a memory pool of its
# activations (`static`'s batch-32 peak: 7.35 GB without, 7.42 GB with; benchmarks/generation.py)
MAX_TOKENS = 16384
GRAPHS_PER_CACHE = 16  # prompt shapes kept per static cache (least recently used dropped); they share one memory pool
_NOT_MODEL_INPUTS = {
    "labels",
    "sample_index",
    "position_ids",
    "cache",
    "past_key_values",
    "use_cache",
    "logits_to_keep",
}


def _parts(model: Any) -> Optional[Tuple[Any, Any, Any, Any]]:
    """(the inner model, its vision encoder, its language model, the head) of a Qwen2-VL model; None
    for a model without them."""
    inner = getattr(model, "model", None)
    found = (
        inner,
        getattr(inner, "visual", None),
        getattr(inner, "language_model", None),
        getattr(model, "lm_head", None),
    )
    return found if None not in found and hasattr(inner, "get_input_embeddings") else None


def cache_keyword(module: Any) -> str:
    """The name `module.forward` takes its KV cache under: `cache` (transformers >= 5.2x) or
    `past_key_values` (looked up once per class: every prefill asks)."""
    return _cache_keyword_of(type(module))


@functools.cache
def _cache_keyword_of(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


class GraphStore:
    """One static cache's captured language-model prefills (one per prompt shape, least recently
    used dropped beyond `limit`), the shapes seen once, and their shared memory pool: the graphs are
    replayed one at a time and each one's output is read before the next replay."""

    def __init__(self, limit: int = GRAPHS_PER_CACHE):
        self.limit = limit
        self.graphs: OrderedDict[Tuple, _LanguageGraph] = OrderedDict()
        self.seen: set = set()
        self.pool: Any = None  # made at the first capture (CUDA only)


class LanguageGraphs:
    """One decoder's policy for the prefill's language-model graphs: which prompts get one, what the
    captures took, and why graphs are no longer used (`off`, after a failure: eagerly from then on)."""

    def __init__(self, max_tokens: int = MAX_TOKENS):
        self.max_tokens = max_tokens
        self.off: Optional[str] = None
        self.capture_seconds: list = []

    def run(
        self,
        forward: _LanguageForward,
        store: Optional[GraphStore],
        embeds: Any,
        mask: Any,
        positions: Any,
        capture_now: bool = False,
    ) -> Any:
        """The last position's logits [B, V] of the language model and head on these inputs, from a
        graph where one is (or now may be) captured for their shape, else eagerly. `store`: None
        where graphs are not used. A graph's logits are its output buffer: read them before the
        next prefill."""
        batch, length = embeds.shape[:2]
        if store is None or self.off is not None or batch * length > self.max_tokens:
            return forward(embeds, mask, positions)
        key = (tuple(embeds.shape), embeds.dtype, mask is None)
        graph = store.graphs.get(key)
        if graph is None and (capture_now or key in store.seen):
            graph = self._capture(forward, store, key, embeds, mask, positions)
        store.seen.add(key)
        if graph is None:
            return forward(embeds, mask, positions)
        store.graphs.move_to_end(key)
        return graph(embeds, mask, positions)

    def _capture(
        self, forward: _LanguageForward, store: GraphStore, key: Tuple, embeds: Any, mask: Any, positions: Any
    ) -> Optional[_LanguageGraph]:
        start = time.perf_counter()
        try:
            if store.pool is None and embeds.is_cuda:
                store.pool = torch.cuda.graph_pool_handle()
            graph = _LanguageGraph(forward, embeds, mask, positions, store.pool)
        except Exception as err:  # noqa: BLE001 - any failure: the language model runs eagerly from now on
            self.off = capture.refusal_reason(err)
            log.warning(
                "generation: capturing the prefill's language model as a CUDA graph failed (%s); it runs eagerly",
                self.off,
            )
            return None
        store.graphs[key] = graph
        while len(store.graphs) > store.limit:
            store.graphs.popitem(last=False)
        seconds = time.perf_counter() - start
        self.capture_seconds.append(seconds)
        log.info(
            "generation: captured the prefill's language model as a CUDA graph (batch %d, %d tokens) in %.2f s",
            key[0][0],
            key[0][1],
            seconds,
        )
        return graph


class _LanguageForward:
    """The language model and head on a prompt's embeddings, into a static cache (reset first, as
    every prefill does): the part of the prefill a graph captures."""

    def __init__(self, model: Any, cache: Any):
        _, _, self.language_model, self.head = _parts(model)
        self.cache = cache
        self.cache_kw = cache_keyword(self.language_model)
        # A prompt without padding into an empty cache: transformers gives SDPA no mask and
        # is_causal=True (its flash kernel), but decides so by reading the cache's device-side
        # length back, which it skips while a graph is captured (it then builds a mask, and another
        # kernel computes slightly different logits). Handing it the per-layer-type masks it would
        # decide on (None) takes the same kernel both ways; not with sliding-window layers.
        sliding = getattr(self.language_model, "has_sliding_layers", True)
        self.causal = None if sliding else {"full_attention": None}

    def __call__(self, embeds: Any, mask: Any, positions: Any) -> Any:
        """`mask`: the [B, L] padding mask, None for a prompt without padding."""
        self.cache.reset()  # in place: the addresses a captured graph uses stay
        attention = mask if mask is not None else self.causal
        hidden = self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            **{self.cache_kw: self.cache},
        ).last_hidden_state
        return self.head(hidden[:, -1:, :])[:, -1, :]  # as the model's forward with logits_to_keep=1


class _LanguageGraph:
    """The language model's prefill for one prompt shape: input buffers and a CUDA graph, checked
    once against the same forward run eagerly."""

    def __init__(self, forward: _LanguageForward, embeds: Any, mask: Any, positions: Any, pool: Any):
        self.forward = forward
        self.embeds, self.positions = embeds.clone(), positions.clone()
        self.mask = mask.clone() if mask is not None else None
        self.logits: Any = None
        self.graph = capture.record_graph(self._run, pool=pool)
        self.logits.zero_()  # a replay that computes nothing is caught below
        self.graph.replay()
        replayed = self.logits.float().clone()
        eager = forward(self.embeds, self.mask, self.positions).float()
        if eager.is_cuda:
            torch.cuda.synchronize()
        if not bool(eager.abs().sum() > 0):
            raise RuntimeError("cannot check the captured prefill: the eager logits are all zeros")
        error = float((replayed - eager).norm() / eager.norm())
        if not error < 1e-2:  # also catches NaN
            raise RuntimeError(
                f"one replay of the captured prefill disagrees with it run eagerly (relative error {error:.3g})"
            )

    def _run(self) -> None:
        self.logits = self.forward(self.embeds, self.mask, self.positions)

    def __call__(self, embeds: Any, mask: Any, positions: Any) -> Any:
        self.embeds.copy_(embeds)
        self.positions.copy_(positions)
        if self.mask is not None:
            self.mask.copy_(mask)
        self.graph.replay()
        return self.logits


def prefill(
    model: Any,
    batch: Dict[str, Any],
    cache: Any,
    graphs: LanguageGraphs,
    store: Optional[GraphStore],
    capture_now: bool = False,
) -> Tuple[Any, Any]:
    """The prompt's forward into the static `cache`: (its last position's logits [B, V], the
    positions [4, B, L] it used); see the module's docstring. `store`: where this cache's graphs
    are kept, None where graphs are not used."""
    parts = _parts(model)
    if parts is None or batch.get("pixel_values_videos") is not None:
        cache.reset()
        positions = prompt_positions(model, batch)
        inputs = {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}
        out = model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
        return out.logits[:, -1, :], positions
    inner, visual, _, _ = parts
    host = host_inputs(batch)  # 1. before anything is queued
    input_ids = batch["input_ids"]
    embeds = inner.get_input_embeddings()(input_ids)  # 2.
    pixels = batch.get("pixel_values")
    features = None
    if pixels is not None:
        features = visual(pixels.type(visual.dtype), grid_thw=batch["image_grid_thw"]).pooler_output
    positions = prompt_positions(model, batch, host)  # 3. on the host, while the GPU encodes the frames
    if features is not None:
        image_token = model.config.image_token_id
        tokens = int((host["input_ids"] == image_token).sum())
        if tokens != features.shape[0]:
            raise ValueError(
                f"Image features and image tokens do not match, tokens: {tokens}, features: {features.shape[0]}"
            )
        where = (input_ids == image_token).unsqueeze(-1)  # 4.
        embeds = embeds.masked_scatter(where, features.to(embeds.device, embeds.dtype))
    mask = batch.get("attention_mask")
    if mask is not None and bool(host["attention_mask"].all()):
        mask = None  # no padding (read from the host copy)
    logits = graphs.run(_LanguageForward(model, cache), store, embeds, mask, positions, capture_now)  # 5.
    return logits, positions
