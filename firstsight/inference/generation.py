"""Greedy decoding for the profile and evaluate tasks: a static KV cache, and on CUDA the decode
step replayed as a CUDA graph (`hardware.generation=static`, the default), or transformers'
`model.generate` with its dynamic cache (`hardware.generation=hf`, the naive baseline).

The static path returns the same new tokens as `model.generate(..., do_sample=False)`:
- prefill once into a `StaticCache` (firstsight/inference/prefill.py), logits of the last position only;
- every later token is one decode step of fixed shapes over preallocated buffers: no host-device
  synchronisation, no data-dependent branch, the greedy choice inside the step;
- on CUDA that step is captured once per shape as a CUDA graph and replayed per token (eager if
  capture fails, and always on the CPU);
- `static_compile`: the step torch.compile'd before capture (COMPILE_OPTIONS), and parts of the
  prefill too (firstsight/inference/compiled_prefill.py): faster, not bit-identical.

The method a run used is what `GreedyDecoder.tag` says: static_cuda_graph |
static_compiled_cuda_graph | static_eager | hf_generate (profile and evaluate record it as the tag
`firstsight.generation`, with `.capture_s`, the seconds the captures took, and `.fallback`, why a
capture or a compilation was given up).

Design notes: docs/design/generation.md; measured: docs/decisions/0002-static-decoding.md.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from transformers import StaticCache

from firstsight.core.errors import FirstSightError
from firstsight.inference import compiled_prefill  # compile_prefill_blocks: a module attribute, tests patch it
from firstsight.inference import cuda_graphs as capture  # patched as a module attribute in tests
from firstsight.inference.compiled_prefill import language_regions_compiled, uncompile_prefill_blocks
from firstsight.inference.prefill import GraphStore, LanguageGraphs, cache_keyword, prefill
from firstsight.inference.vision_graph import VisionGraphs
from firstsight.training.loop import to_device

log = logging.getLogger(__name__)

METHODS = ("static", "static_compile", "hf")
STATIC_CUDA_GRAPH = "static_cuda_graph"
STATIC_COMPILED_CUDA_GRAPH = "static_compiled_cuda_graph"  # static_compile: the captured step is torch.compile'd
STATIC_EAGER = "static_eager"
HF_GENERATE = "hf_generate"
CACHE_ROUNDING = 64  # cache lengths are rounded up to a multiple of this: one capture serves nearby prompt lengths
# Generation-config settings that change greedy decoding and that the static path does not
# implement: with any of them set, decoding goes through model.generate (said once in the log).
_UNSUPPORTED = {
    "num_beams": (None, 1),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "sequence_bias": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "min_length": (None, 0),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1, 1.0),
    "stop_strings": (None,),
    "max_time": (None,),
    "watermarking_config": (None,),
    "prompt_lookup_num_tokens": (None,),
}


@dataclass
class Generated:
    tokens: Any  # [batch, n] new token ids, as model.generate's output after the prompt
    method: str  # static_cuda_graph | static_compiled_cuda_graph | static_eager | hf_generate
    logits: Any = None  # [n, batch, vocab] float32 raw logits per step, when asked for (record_logits)


def method_name(value: Any) -> str:
    """'static', 'static_compile' or 'hf' from a config value (the Generation enum or its string)."""
    name = value.value if hasattr(value, "value") else str(value)
    if name not in METHODS:
        raise FirstSightError(
            f"hardware.generation={name!r} is not a generation method; choose one of {', '.join(METHODS)}"
        )
    return name


_DECODERS: weakref.WeakKeyDictionary[Any, Dict[str, GreedyDecoder]] = weakref.WeakKeyDictionary()


def decoder_for(
    model: Any, method: Any = "static", check_every: int = 8, cuda_graphs: Optional[bool] = None
) -> GreedyDecoder:
    """The model's decoder for `method`, kept (with its captured graphs and caches) as long as the
    model lives, so later calls reuse what earlier ones captured."""
    name = method_name(method)
    model_type = getattr(getattr(model, "config", None), "model_type", "qwen2_vl")
    if model_type != "qwen2_vl" and name != "hf":  # the static prefill (M-RoPE, vision graphs) is Qwen2-VL's
        log.info(
            "hardware.generation=%s decodes Qwen2-VL models: this %s model answers through generate", name, model_type
        )
        name = "hf"
    per_model = _DECODERS.setdefault(model, {})
    key = f"{name}/{check_every}/{cuda_graphs}"
    if key not in per_model:
        per_model[key] = GreedyDecoder(model, name, check_every=check_every, cuda_graphs=cuda_graphs)
    return per_model[key]


def generation_tags(decoder: GreedyDecoder) -> Dict[str, str]:
    """What a run records of its decoding: `firstsight.generation` (the method used), the seconds
    its CUDA-graph captures took, and why graphs were not used when a capture failed."""
    tags = {"firstsight.generation": decoder.tag}
    captures = decoder.capture_seconds + decoder.vision_graphs.capture_seconds + decoder.language_graphs.capture_seconds
    if captures:
        tags["firstsight.generation.capture_s"] = f"{sum(captures):.3f}"
    for name, graphs in (("vision_graphs", decoder.vision_graphs), ("prefill_graphs", decoder.language_graphs)):
        if graphs.capture_seconds:
            tags[f"firstsight.generation.{name}"] = str(len(graphs.capture_seconds))
    fallback = "; ".join(
        f"{what}: {why}"
        for what, why in (
            ("torch.compile", decoder.compile_off),
            ("CUDA graphs", decoder.graphs_off),
            ("vision CUDA graph", decoder.vision_graphs.off),
            ("prefill CUDA graph", decoder.language_graphs.off),
            ("compiled prefill blocks", decoder.prefill_compile_off),
        )
        if why
    )
    if fallback:
        tags["firstsight.generation.fallback"] = fallback
    return tags


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _as_ids(value: Any) -> Tuple[int, ...]:
    if value is None:
        return ()
    if hasattr(value, "tolist"):
        value = value.tolist()
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


class GreedyDecoder:
    """Greedy decoding of one model by one method; see the module's docstring."""

    def __init__(
        self,
        model: Any,
        method: str = "static",
        check_every: int = 8,
        cuda_graphs: Optional[bool] = None,
        compile_options: Optional[Dict[str, Any]] = None,
    ):
        self._model = weakref.ref(model)  # no strong reference: the decoder lives and dies with the model
        self.method = method_name(method)
        # static_compile: the decode step's forward is torch.compile'd (inductor, static shapes) and then
        # captured; only where graphs are captured (CUDA), once per batch size (tens of seconds at 2B)
        self.compile = self.method == "static_compile"
        self.compile_options = compile_options  # inductor's options for it; None: COMPILE_OPTIONS
        self.compile_off: Optional[str] = None  # why the compiled step is not used (after a failure)
        self.prefill_compile_off: Optional[str] = None  # why the prefill's blocks are not compiled (ditto)
        # static_compile: the prefill's language-model norms and MLPs run compiled (benchmarks switch it off to compare)
        self.compile_language_prefill = self.compile
        self._prefill_untried = False  # prefill blocks compiled, no prefill through them has succeeded yet
        self.check_every = max(1, int(check_every))
        self.cuda_graphs = cuda_graphs  # None: on CUDA devices; True/False: force (tests)
        self.methods_used: List[str] = []  # in order of first use
        self.capture_seconds: List[float] = []  # one per captured graph
        self._entries: Dict[Tuple, _StaticEntry] = {}
        self.graphs_off: Optional[str] = None  # why CUDA graphs are not used (after a failed capture)
        self._said: set = set()  # reasons for model.generate already logged
        self.vision_graphs = VisionGraphs()  # the prefill's vision encoder as CUDA graphs (where graphs are used)
        self.language_graphs = LanguageGraphs()  # the prefill's language model as CUDA graphs (ditto)
        self._cache_kw = cache_keyword(model)  # transformers >= 5.2x renamed it

    # ------------------------------------------------------------------ what a run records

    @property
    def tag(self) -> str:
        """The method(s) used so far (static_cuda_graph | static_compiled_cuda_graph | static_eager |
        hf_generate, '+'-joined if calls differed); before any call, the method that will be tried."""
        if self.methods_used:
            return "+".join(self.methods_used)
        if self.method == "hf" or self._static_off(self.model()):
            return HF_GENERATE
        if not self._graphs_wanted(self.model_device()):
            return STATIC_EAGER
        return STATIC_COMPILED_CUDA_GRAPH if self.compile and not self.compile_off else STATIC_CUDA_GRAPH

    def model(self) -> Any:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this decoder no longer exists")
        return model

    def model_device(self) -> Any:
        try:
            return next(self.model().parameters()).device
        except StopIteration:
            return torch.device("cpu")

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        batch: Dict[str, Any],
        max_new_tokens: int,
        min_new_tokens: int = 0,
        eos_token_id: Any = None,
        pad_token_id: Optional[int] = None,
        record_logits: bool = False,
    ) -> Generated:
        """New tokens [B, n] as `model.generate(**batch, max_new_tokens=..., min_new_tokens=...,
        do_sample=False, pad_token_id=...)[:, prompt_length:]` returns them (eos_token_id: an id or a
        list, default the generation config's; pad_token_id: default the generation config's, else
        the first end token);
        with `record_logits`, also the raw logits of every step [n, B, vocab] (float32) — for tests
        and benchmarks (a separate capture)."""
        model = self.model()
        eos, pad = self._resolve_ids(model, eos_token_id, pad_token_id)
        if not min_new_tokens:  # as generate: the generation config's, unless given
            min_new_tokens = getattr(model.generation_config, "min_new_tokens", None) or 0
        if self.method == "hf" or self._static_off(model):
            return self._hf(model, batch, max_new_tokens, min_new_tokens, eos_token_id, pad, record_logits)
        with torch.no_grad():
            return self._static(model, batch, int(max_new_tokens), int(min_new_tokens or 0), eos, pad, record_logits)

    def reserve(
        self,
        batch_size: int,
        prompt_length: int,
        max_new_tokens: int,
        eos_token_id: Any = None,
        record_logits: bool = False,
    ) -> None:
        """Prepare (allocate, and on CUDA capture) the decode step for batches of `batch_size`
        prompts up to `prompt_length` tokens, so that no later call within it pays the capture
        (the profile task calls this before its timed queries). Nothing to do for method hf."""
        model = self.model()
        if self.method == "hf" or self._static_off(model):
            return
        eos, _ = self._resolve_ids(model, eos_token_id, None)
        with torch.no_grad():
            self._entry(
                model,
                batch_size,
                prompt_length + max_new_tokens,
                eos,
                max_new_tokens if record_logits else 0,
                self.model_device(),
            )

    def reserve_prefill(self, batch: Dict[str, Any], max_new_tokens: int) -> None:
        """Run this batch's prefill once (a host batch is moved to the model's device first),
        capturing the graphs it replays (the vision encoder's for its frame grid, the language
        model's for its shape), so that no later use of the same shape pays them. Call `reserve`
        for the batch size first: the language model's graph belongs to that static cache. Nothing
        to do where graphs are not used (CPU, method hf)."""
        if not self.prefill_graphs():
            return
        model = self.model()
        batch = to_device(batch, self.model_device())
        eos, _ = self._resolve_ids(model, None, None)
        size, prompt = batch["input_ids"].shape
        with torch.no_grad():
            entry = self._entry(model, size, prompt + max_new_tokens, eos, 0, self.model_device())
            self._compile_prefill(model)
            self._prefill(model, batch, entry, capture_now=True)

    def _compile_prefill(self, model: Any) -> None:
        """static_compile, where graphs are used: the prefill's blocks compiled (once per model;
        firstsight/inference/compiled_prefill.py)."""
        if (
            self.compile
            and self.compile_off is None
            and self.prefill_compile_off is None
            and self._graphs_wanted(self.model_device())
        ):
            compiled = compiled_prefill.compile_prefill_blocks(model)  # > 0 once per model
            if compiled and subclass_weights(model):
                log.info(
                    "generation: torchao-quantized weights: the compiled prefill runs their products as "
                    "torchao's own eager kernels and leaves the language model's MLPs uncompiled"
                )
            self._prefill_untried = compiled > 0 or self._prefill_untried

    def _prefill(self, model: Any, batch: Dict[str, Any], entry: _StaticEntry, capture_now: bool = False) -> Any:
        """The prompt's forward into the entry's cache (its last position's logits: firstsight/inference/prefill.py,
        its language model replayed from a graph where graphs are used; `capture_now`: capture one
        for this shape now rather than on its second prefill). If the first one through freshly
        compiled blocks fails (a compiler error surfaces on first use), the blocks are uncompiled
        and it runs again; any later failure is the caller's."""
        store = entry.graph_store if self.prefill_graphs() else None
        try:
            with self._prefill_serving(model, batch):
                logits = entry.prefill(model, batch, self.language_graphs, store, capture_now)
        except Exception as err:  # noqa: BLE001 - only the first prefill after compiling is retried
            if not self._prefill_untried:
                raise
            self._prefill_untried = False
            self.prefill_compile_off = capture.refusal_reason(err)
            uncompile_prefill_blocks(model)
            log.warning(
                "generation: the compiled prefill blocks failed (%s); the prefill runs uncompiled",
                self.prefill_compile_off,
            )
            # captures that failed through them may succeed without them
            self.vision_graphs.off = self.language_graphs.off = None
            with self._prefill_serving(model, batch):
                logits = entry.prefill(model, batch, self.language_graphs, store, capture_now)
        self._prefill_untried = False
        return logits

    def prefill_graphs(self) -> bool:
        """Whether prefills may replay graphs (the static method, where decode steps are captured)."""
        return self.method != "hf" and not self._static_off(self.model()) and self._graphs_wanted(self.model_device())

    def _resolve_ids(self, model: Any, eos_token_id: Any, pad_token_id: Optional[int]) -> Tuple[Tuple[int, ...], int]:
        config = model.generation_config
        eos = _as_ids(eos_token_id if eos_token_id is not None else config.eos_token_id)
        if pad_token_id is None:
            pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
        return eos, int(pad_token_id)

    def _used(self, method: str) -> None:
        if method not in self.methods_used:
            self.methods_used.append(method)

    def _hf(
        self,
        model: Any,
        batch: Dict[str, Any],
        max_new_tokens: int,
        min_new_tokens: int,
        eos_token_id: Any,
        pad: int,
        record_logits: bool,
    ) -> Generated:
        kwargs: Dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        if min_new_tokens:
            kwargs["min_new_tokens"] = min_new_tokens
        if eos_token_id is not None:
            kwargs["eos_token_id"] = eos_token_id
        if record_logits:
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        with torch.no_grad():
            out = model.generate(**batch, **kwargs)
        self._used(HF_GENERATE)
        prompt = batch["input_ids"].shape[1]
        if record_logits:
            return Generated(out.sequences[:, prompt:], HF_GENERATE, torch.stack([l.float() for l in out.logits]))
        return Generated(out[:, prompt:], HF_GENERATE)

    def _static(
        self,
        model: Any,
        batch: Dict[str, Any],
        max_new: int,
        min_new: int,
        eos: Tuple[int, ...],
        pad: int,
        record_logits: bool,
    ) -> Generated:
        input_ids = batch["input_ids"]
        size, prompt = input_ids.shape
        device = input_ids.device
        if max_new <= 0:
            return Generated(input_ids.new_zeros((size, 0)), self.tag)
        entry = self._entry(model, size, prompt + max_new, eos, max_new if record_logits else 0, device)
        self._compile_prefill(model)
        first_logits = self._prefill(model, batch, entry)
        entry.start(batch, min_new, pad)
        entry.select(first_logits)  # token 0, eagerly, by the same code the step runs
        done = 1
        # all rows can only finish once end tokens are allowed; before that, no reading back
        check = min_new < max_new and bool(eos)
        while done < max_new:
            entry.decode(model, self._cache_kw)
            done += 1
            if check and done >= max(min_new, 1) and done % self.check_every == 0 and done < max_new:
                if bool(entry.finished.all()):  # the one host-device synchronisation, every check_every steps
                    break
        method = (
            STATIC_EAGER if entry.graph is None else STATIC_COMPILED_CUDA_GRAPH if entry.compiled else STATIC_CUDA_GRAPH
        )
        self._used(method)
        tokens = entry.out[:, :done]
        if check:  # as generate: stop after the step where the last row finished
            is_end = torch.isin(tokens, entry.eos)
            if bool(is_end.any(1).all()):
                last = int(is_end.int().argmax(1).max()) + 1
                tokens = tokens[:, :last]
        logits = entry.logits_rec[: tokens.shape[1]].clone() if record_logits else None
        return Generated(tokens.clone(), method, logits)

    # ------------------------------------------------------------------ static entries and graphs

    @contextlib.contextmanager
    def _prefill_serving(self, model: Any, batch: Dict[str, Any]) -> Iterator[None]:
        """Where decode steps are captured, the prefill's vision encoder is replayed from a CUDA graph
        too (firstsight/inference/vision_graph.py), and under static_compile the language model's compiled
        norms and MLPs are switched on (firstsight/inference/compiled_prefill.py); elsewhere nothing changes."""
        with contextlib.ExitStack() as stack:
            if self.prefill_graphs():
                stack.enter_context(self.vision_graphs.serving(model, batch))
            if self.compile_language_prefill and self.prefill_compile_off is None:
                stack.enter_context(language_regions_compiled(model))
            yield

    def _graphs_wanted(self, device: Any) -> bool:
        if self.graphs_off is not None:
            return False
        if self.cuda_graphs is not None:
            return self.cuda_graphs
        return getattr(device, "type", str(device)) == "cuda"

    def _entry(
        self, model: Any, size: int, needed: int, eos: Tuple[int, ...], record: int, device: Any
    ) -> _StaticEntry:
        penalty = _repetition_penalty(model)
        key = (size, eos, penalty, record)
        entry = self._entries.get(key)
        if entry is not None and entry.cache_len >= needed:
            return entry
        self._entries.pop(key, None)  # a longer cache is needed: free the shorter one first
        cache_len = _round_up(needed, CACHE_ROUNDING)
        entry = _StaticEntry(model, size, cache_len, eos, penalty, record, device, self._cache_kw)
        if self._graphs_wanted(device):
            self._capture(model, entry)
        self._entries[key] = entry
        return entry

    def _capture(self, model: Any, entry: _StaticEntry) -> None:
        start = time.perf_counter()
        if self.compile and not self.compile_off:
            # said before it starts: nothing else is printed while inductor works (~45-75 s per batch
            # size for the 2B student on an H200; measured: docs/decisions/0002-static-decoding.md)
            log.info(
                "generation: compiling the decode step for batch %d, cache %d tokens (torch.compile: about a "
                "minute per batch size for a 2B model on an H200)",
                entry.size,
                entry.cache_len,
            )
            try:
                self._capture_with(model, entry, _compiled_forward(model, self.compile_options))
                entry.compiled = True
            except Exception as err:  # noqa: BLE001 - any failure: capture the plain step instead
                self.compile_off = capture.refusal_reason(err)
                log.warning(
                    "generation: capturing the torch.compile'd decode step failed (%s); capturing the "
                    "plain step instead",
                    self.compile_off,
                )
        if entry.graph is None:
            try:
                self._capture_with(model, entry, model)
            except Exception as err:  # noqa: BLE001 - any failure: the same static loop, eagerly
                self.graphs_off = capture.refusal_reason(err)
                log.warning(
                    "generation: CUDA graph capture of the decode step failed (%s); decoding with the "
                    "static cache eagerly instead",
                    self.graphs_off,
                )
                return
        seconds = time.perf_counter() - start
        self.capture_seconds.append(seconds)
        log.info(
            "generation: captured the %sdecode step as a CUDA graph (batch %d, cache %d tokens) in %.2f s",
            "torch.compile'd " if entry.compiled else "",
            entry.size,
            entry.cache_len,
            seconds,
        )

    def _capture_with(self, model: Any, entry: _StaticEntry, forward: Any) -> None:
        """Warm the step up on a side stream, capture it, check one replay against the step run
        eagerly; on any failure `entry.graph` stays None and the error propagates."""
        try:
            entry.rewind()
            entry.graph = capture.record_graph(lambda: entry.step(forward, self._cache_kw))
            mismatch = entry.check_graph(forward, self._cache_kw)
            if mismatch:
                raise RuntimeError(mismatch)
            if entry.tok.is_cuda:
                torch.cuda.synchronize()
        except BaseException:
            entry.graph = None
            raise

    def _static_off(self, model: Any) -> Optional[str]:
        """Why this model goes through model.generate although the method is static (said once)."""
        reason = self._static_blocker(model)
        if reason and reason not in self._said:
            self._said.add(reason)
            log.info("generation: %s; decoding with model.generate instead of the static path", reason)
        return reason

    @staticmethod
    def _static_blocker(model: Any) -> Optional[str]:
        """Why the static path cannot reproduce model.generate for this model (None: it can)."""
        inner = getattr(model, "model", None)
        if not hasattr(inner, "get_rope_index"):
            return f"{type(model).__name__} is not a Qwen2-VL model (no get_rope_index)"
        config = getattr(model, "generation_config", None)
        for name, neutral in _UNSUPPORTED.items():
            value = getattr(config, name, None)
            if value not in neutral:
                return f"the model's generation config sets {name}={value!r}, which the static path does not implement"
        return None


# inductor options of static_compile's step, for every model. With coordinate descent tuning,
# inductor turns the batch-1 step's matrix-vector products into its own reductions, fused with their
# neighbours, and tunes them: on an H200 the 2B student's batch-1 answer took 117.7 instead of 128.7 ms
# (same tokens; batch 32 unchanged), for ~17-30 s more compiling per shape (host_work.py --parts
# decode_tuning measures it again). With it torchao's int8 student's decode step took 2.19 ms against
# bf16's 2.33 ms (H200); with inductor's defaults its whole answer took 0.718 s against bf16's 0.085 s.
# measured: docs/decisions/0010-static-compile-tuning.md
COMPILE_OPTIONS: Dict[str, Any] = {"coordinate_descent_tuning": True}


def subclass_weights(model: Any) -> bool:
    """Whether any of the model's weights is a tensor subclass (torchao: precision=int8_weight_only,
    fp8), whose products inductor compiles as dequantizing kernels."""
    return any(is_traceable_wrapper_subclass(p) for p in model.parameters())


def _compiled_forward(model: Any, options: Optional[Dict[str, Any]] = None) -> Any:
    """The model's forward under torch.compile (inductor with `options`, default COMPILE_OPTIONS;
    static shapes, no cudagraphs of its own: the decoder captures the step itself), made once per
    model and options and kept on the model."""
    options = COMPILE_OPTIONS if options is None else options
    per_options = model.__dict__.setdefault("_firstsight_compiled_forward", {})
    key = tuple(sorted(options.items()))
    if key not in per_options:
        # kept on the model (a reference cycle the garbage collector frees with the model), not on
        # the decoder, which must not keep the model alive
        per_options[key] = torch.compile(model, dynamic=False, fullgraph=False, options=dict(options))
    return per_options[key]


def _repetition_penalty(model: Any) -> Optional[float]:
    penalty = getattr(model.generation_config, "repetition_penalty", None)
    return None if penalty in (None, 1, 1.0) else float(penalty)


class _StaticEntry:
    """A StaticCache and the decode step's buffers for one batch size and cache length (and,
    when captured, its CUDA graph). Every tensor the step reads or writes lives here, at a fixed
    address, so that a replay of the graph is the step."""

    def __init__(
        self,
        model: Any,
        size: int,
        cache_len: int,
        eos: Tuple[int, ...],
        penalty: Optional[float],
        record: int,
        device: Any,
        cache_kw: str,
    ):
        self.size, self.cache_len, self.penalty, self.record = size, cache_len, penalty, record
        self.graph: Any = None
        self.compiled = False  # the captured step is the torch.compile'd forward's
        self.cache = StaticCache(config=model.config, max_cache_len=cache_len)
        self.graph_store = GraphStore()  # the prefill's language-model graphs into this cache
        longs = dict(dtype=torch.long, device=device)
        self.tok = torch.zeros(size, 1, **longs)  # the last chosen token: the step's input
        self.pos = torch.zeros(4, size, 1, **longs)  # its positions (text row + 3 M-RoPE rows)
        self.mask = torch.ones(size, cache_len, dtype=torch.bool, device=device)  # padding mask over the cache
        self.count = torch.zeros(1, **longs)  # tokens chosen so far = the index of the next one
        self.min_new = torch.zeros(1, **longs)
        self.pad = torch.zeros(1, **longs)
        self.finished = torch.zeros(size, dtype=torch.bool, device=device)
        self.out = torch.zeros(size, cache_len, **longs)  # chosen tokens (the first max_new columns are used)
        self.eos = torch.tensor(eos if eos else [-1], **longs)
        # initialise the cache's tensors (lazily made on the first write) with one dummy token
        logits = model(
            input_ids=self.tok, position_ids=self.pos, use_cache=True, logits_to_keep=1, **{cache_kw: self.cache}
        ).logits
        self.vocab = vocab = logits.shape[-1]
        self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        valid = [e for e in eos if 0 <= e < vocab]
        if valid:
            self.eos_mask[torch.tensor(valid, device=device)] = True
        self.seen = torch.zeros(size, vocab, dtype=torch.bool, device=device) if penalty is not None else None
        self.logits_rec = torch.zeros(record, size, vocab, dtype=torch.float32, device=device) if record else None

    # per call
    def prefill(self, model: Any, batch: Dict[str, Any], graphs: Any, store: Any, capture_now: bool = False) -> Any:
        logits, positions = prefill(model, batch, self.cache, graphs, store, capture_now)
        self.pos.copy_(positions[..., -1:] + 1)
        return logits

    def start(self, batch: Dict[str, Any], min_new: int, pad: int) -> None:
        input_ids = batch["input_ids"]
        prompt = input_ids.shape[1]
        mask = batch.get("attention_mask")
        self.mask.fill_(True)
        if mask is not None:
            self.mask[:, :prompt].copy_(mask.bool())
        self.count.zero_()
        self.min_new.fill_(min_new)
        self.pad.fill_(pad)
        self.finished.zero_()
        if self.seen is not None:  # the repetition penalty counts the whole prompt, padding included (as generate)
            self.seen.zero_()
            self.seen.scatter_(1, input_ids, True)
        if self.logits_rec is not None:
            self.logits_rec.zero_()

    # the step: no synchronisation, no shape change, no data-dependent Python branch
    def select(self, logits: Any) -> None:
        raw = logits.float()
        if self.logits_rec is not None:
            self.logits_rec.index_copy_(0, self.count.clamp(max=self.record - 1), raw.unsqueeze(0))
        scores = raw
        if self.seen is not None:
            penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
            scores = torch.where(self.seen, penalised, scores)
        scores = scores.masked_fill(self.eos_mask & (self.count < self.min_new), float("-inf"))
        chosen = scores.argmax(-1)
        chosen = torch.where(self.finished, self.pad, chosen)
        self.out.index_copy_(1, self.count.clamp(max=self.cache_len - 1), chosen.unsqueeze(1))
        self.finished |= (chosen.unsqueeze(1) == self.eos).any(1)  # isin, as a plain broadcast (no sort)
        if self.seen is not None:
            self.seen.scatter_(1, chosen.unsqueeze(1), True)
        self.tok.copy_(chosen.unsqueeze(1))
        self.count.add_(1)

    def step(self, forward: Any, cache_kw: str) -> None:
        """One decode step by `forward` (the model, or its compiled forward)."""
        out = forward(
            input_ids=self.tok,
            attention_mask=self.mask,
            position_ids=self.pos,
            use_cache=True,
            logits_to_keep=1,
            **{cache_kw: self.cache},
        )
        self.select(out.logits[:, -1, :])
        self.pos.add_(1)

    def decode(self, model: Any, cache_kw: str) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step(model, cache_kw)

    def rewind(self) -> None:
        """Back to the state right after the dummy first token (before warming up a capture)."""
        for layer in self.cache.layers:
            if hasattr(layer, "cumulative_length") and not isinstance(layer.cumulative_length, int):
                layer.cumulative_length.fill_(1)
        for t in (self.pos, self.count, self.finished):
            t.zero_()
        # distinct ordinary tokens (not 0, often the padding row, whose zero embedding would make
        # every hidden state zero and the check of the capture vacuous)
        self.tok.copy_(torch.arange(1, self.size + 1, device=self.tok.device).view(-1, 1) * 7 % self.vocab)

    # a captured graph is checked once against the same step run eagerly, from the same state
    def _state(self) -> List[Any]:
        tensors = [self.tok, self.pos, self.count, self.finished, self.min_new, self.pad]
        tensors += [layer.cumulative_length for layer in self.cache.layers if hasattr(layer, "cumulative_length")]
        if self.seen is not None:
            tensors.append(self.seen)
        return tensors

    def _fingerprint(self) -> List[Any]:
        """What one step wrote: the chosen token and the last layer's key/value at its slot."""
        layer = self.cache.layers[-1]
        slot = int(layer.cumulative_length) - 1
        return [self.tok.clone(), layer.keys[:, :, slot].float().clone(), layer.values[:, :, slot].float().clone()]

    def check_graph(self, forward: Any, cache_kw: str) -> Optional[str]:
        """None if one replay of the graph computes what one eager step of the same `forward`
        computes (relative error of the last layer's new key and value under 1e-2: a kernel that
        captured stale pointers or host-side values is off by O(1)), else what differs. Leaves the
        buffers in some state: every call starts them afresh."""
        saved = [t.clone() for t in self._state()]
        self.graph.replay()
        if self.tok.is_cuda:
            torch.cuda.synchronize()
        replayed = self._fingerprint()
        for t, s in zip(self._state(), saved):
            t.copy_(s)
        self.step(forward, cache_kw)
        eager = self._fingerprint()
        for name, a, b in zip(("key", "value"), replayed[1:], eager[1:]):
            if not bool(b.abs().sum() > 0):
                return f"cannot check the captured step: the eager step's last-layer {name} is all zeros"
            error = float((a - b).norm() / b.norm())
            if not error < 1e-2:  # also catches NaN
                return f"one replay of the captured step disagrees with the step run eagerly (last-layer {name}: relative error {error:.3g})"
        return None
