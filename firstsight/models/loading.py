"""Build or load the teacher and the student, with precision applied.

Every side resolves to one of three origins: the embedded tiny builder, a hub id, or a local
directory; `weights: random` builds the same architecture at full size with random weights.
The frozen teacher takes `precision.dtype` and `precision.quantization` (bitsandbytes INT8/NF4),
part by part where `precision.parts` says so (firstsight.models.parts: vision tower, merger, language model);
the trainable student keeps float32 master weights and trains under autocast to
`precision.dtype` (mixed precision), so fp16/bf16 never update weights in low precision.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch._functorch.config as functorch_config
from transformers import (
    AutoConfig,
    AutoProcessor,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

from firstsight.config.schema import ModelConfig, ModelSideConfig
from firstsight.config.specs import ModelSpec
from firstsight.core.errors import FirstSightError
from firstsight.core.files import staged_dir
from firstsight.core.memory import uncapped
from firstsight.core.runtime import in_hub_cache, is_offline, torch_dtype
from firstsight.models.architectures import KNOWN_ARCHITECTURES, known_config
from firstsight.models.decode_attention import group_decode
from firstsight.models.llava_ov import (
    KNOWN_LLAVA_ONEVISION,
    LLAVA_ONEVISION,
    MODEL_TYPES,
    QWEN2_VL,
    answer_vocabulary_mismatch,
    known_llava_config,
    tiny_llava_config,
    tiny_llava_processor,
)
from firstsight.models.lora import apply_lora
from firstsight.models.parts import (
    TORCHAO_KINDS,
    PartPrecision,
    apply_part_dtypes,
    base_model,
    part_bytes,
    part_of,
    part_weights_gb,
    quantization_kind,
    resolve_parts,
    skip_modules,
)
from firstsight.models.pretrain import tiny_model_dir
from firstsight.models.tiny import tiny_model_config, tiny_processor
from firstsight.models.vision_attention import batch_frames

log = logging.getLogger(__name__)

# Qwen2-VL's own processor: 4 to 1280 visual tokens of 28x28 pixels per image.
REAL_PIXEL_RANGE = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
# precision=fp8: the smallest largest-magnitude an activation row is scaled by (quantize_after_loading)
FP8_ACTIVATION_AMAX_FLOOR = 1e-12


@dataclass
class LoadedModel:
    model: Any
    role: str  # teacher | student
    origin: str  # what it was built from (tiny, a hub id, a directory, a cache path)
    params_b: float  # parameters, billions
    weights_gb: float  # parameters + buffers as loaded (transformers' memory footprint)
    load_time_s: float
    vocab_rows: int  # output rows of the LM head
    parts: Dict[str, PartPrecision] = field(default_factory=dict)  # resolved precision per part
    part_weights_gb: Dict[str, float] = field(default_factory=dict)  # weights_gb split by part, measured


def _value(x: Any) -> str:
    return x.value if hasattr(x, "value") else str(x)


def load_processor(model: ModelConfig, cache_dir: str) -> Any:
    """The student's processor (teacher and student share the tokenizer); the embedded offline
    one for tiny models and for random-weight architectures whose processor is not at hand."""
    student = model.student
    if student.source == "tiny":
        return tiny_processor(cache_dir)
    if _value(student.weights) == "random" and not os.path.isdir(student.source):
        if is_offline() and not in_hub_cache(student.source, student.revision):
            log.info(
                "no processor of %s at hand offline: using the embedded tokenizer with Qwen2-VL's pixel range",
                student.source,
            )
            processor = tiny_processor(cache_dir)
            # the stand-in must cut frames into as many visual tokens as the real processor would
            processor.image_processor.size = dict(REAL_PIXEL_RANGE)
            return processor
    return _checkpoint_processor(student, "student", model.trust_remote_code)


def shares_the_processor(model: ModelConfig) -> bool:
    """Teacher and student use one processor by construction (tiny, the same source, or a
    random-weight teacher built over the student's processor): nothing to compare. A teacher of
    another architecture has its own processor (load_teacher_processor)."""
    teacher = model.teacher
    if side_architecture(teacher) != QWEN2_VL:
        return False
    return teacher.source in ("tiny", model.student.source) or _value(teacher.weights) == "random"


def side_architecture(side: ModelSideConfig) -> str:
    """The model type of a side: a tiny one's `architecture` (null: Qwen2-VL), a known hub id's,
    else its config.json's `model_type` (a local directory, or the hub cache)."""
    if side.source == "tiny":
        return _value(side.tiny.get("architecture") or QWEN2_VL) if side.tiny is not None else QWEN2_VL
    if side.source in KNOWN_LLAVA_ONEVISION:
        return LLAVA_ONEVISION
    if side.source in KNOWN_ARCHITECTURES:
        return QWEN2_VL
    config_file = os.path.join(side.source, "config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            try:
                return json.load(f).get("model_type", QWEN2_VL)
            except ValueError:
                return QWEN2_VL  # a damaged config.json is reported where the model is loaded
    try:
        return AutoConfig.from_pretrained(side.source, revision=side.revision, local_files_only=is_offline()).model_type
    except (OSError, ValueError):
        return QWEN2_VL  # not at hand: the loading names the source that cannot be read


def check_pairable(model: ModelConfig) -> None:
    """Both sides are of a class the suite can pair: the student a Qwen2-VL, the teacher a
    Qwen2-VL or a LLaVA-OneVision (each with its own processor). One line otherwise."""
    for role in ("student", "teacher"):
        kind = side_architecture(model[role])
        allowed = (QWEN2_VL,) if role == "student" else MODEL_TYPES
        if kind not in allowed:
            raise FirstSightError(
                f"model.{role}.source={model[role].source!r} is a {kind!r} model: the {role} must be "
                f"{' or '.join(allowed)}"
            )


def load_teacher_processor(model: ModelConfig, cache_dir: str) -> Optional[Any]:
    """The teacher's own processor when its architecture is not the student's (None: the teacher
    takes the student's): the embedded tiny LLaVA-OneVision's, an offline stand-in with the real
    sizes for a random-weight checkpoint not at hand, else the checkpoint's."""
    teacher = model.teacher
    if side_architecture(teacher) == QWEN2_VL:
        return None
    if teacher.source == "tiny":
        return tiny_llava_processor(cache_dir)
    if _value(teacher.weights) == "random" and not os.path.isdir(teacher.source):
        if is_offline() and not in_hub_cache(teacher.source, teacher.revision):
            log.info(
                "no processor of %s at hand offline: the embedded tokenizer with its real image sizes", teacher.source
            )
            return tiny_llava_processor(cache_dir, real=True)
    return _checkpoint_processor(teacher, "teacher", model.trust_remote_code)


def _checkpoint_processor(side: ModelSideConfig, role: str, trust_remote_code: bool) -> Any:
    """The processor saved with a side's checkpoint (a local directory or a hub id)."""
    try:
        return AutoProcessor.from_pretrained(
            side.source,
            revision=side.revision,
            local_files_only=is_offline(),
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as err:
        raise FirstSightError(f"could not load the processor of model.{role}.source={side.source!r}: {err}") from err


def check_same_tokenizer(model: ModelConfig, processor: Any, teacher_processor: Optional[Any] = None) -> None:
    """Teacher and student must share one tokenizer (padding rows aside) for KD to be defined; a
    teacher of another architecture (its own `teacher_processor`) must give every answer token the
    student's id. Checked by firstsight.suite.validate before a distill job creates its run."""
    teacher = model.teacher
    if teacher_processor is not None:
        why = answer_vocabulary_mismatch(processor.tokenizer, teacher_processor.tokenizer)
        if why:
            raise FirstSightError(
                f"teacher {teacher.source!r} ({type(teacher_processor.tokenizer).__name__}, "
                f"{len(teacher_processor.tokenizer)} tokens) and student {model.student.source!r} "
                f"({type(processor.tokenizer).__name__}, {len(processor.tokenizer)} tokens) tokenize answers "
                f"differently: {why}. Token-level KD needs the same answer tokens on both sides."
            )
        return
    if shares_the_processor(model):
        return
    try:
        teacher_tok = AutoTokenizer.from_pretrained(
            teacher.source,
            revision=teacher.revision,
            local_files_only=is_offline(),
            trust_remote_code=model.trust_remote_code,
        )
    except (OSError, ValueError) as err:
        raise FirstSightError(
            f"could not load the tokenizer of model.teacher.source={teacher.source!r} to compare it "
            f"with the student's: {err}"
        ) from err
    if teacher_tok.get_vocab() != processor.tokenizer.get_vocab():
        raise FirstSightError(
            f"teacher {teacher.source!r} and student {model.student.source!r} use different tokenizers "
            f"({len(teacher_tok)} vs {len(processor.tokenizer)} tokens): token-level KD needs one shared vocabulary."
        )


def quantization_config(parts: Dict[str, PartPrecision]) -> Optional[Any]:
    """One BitsAndBytesConfig for the model's quantized parts (None when no part is quantized, or
    when torchao quantizes them after loading: quantize_after_loading); the unquantized parts and
    the output head are its `llm_int8_skip_modules`."""
    kind = quantization_kind(parts)
    if kind is None or kind in TORCHAO_KINDS:
        return None
    skip = skip_modules(parts)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if kind == "nf4":
        quantized = [p for p in ("language", "merger", "vision") if parts[p].quantized]
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch_dtype(parts[quantized[0]].dtype),  # per part after loading
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=skip,
        )
    raise FirstSightError(f"quantization {kind!r} is not supported; choose none, int8 or nf4")


def quantize_after_loading(model: Any, parts: Dict[str, PartPrecision]) -> None:
    """torchao kinds (parts.TORCHAO_KINDS): the quantized parts' Linear layers get torchao weights in
    place (the output head never): int8_weight_only = int8 weights with per-row scales; fp8 = float8
    e4m3 weights and dynamically quantized activations with per-row scales (torch._scaled_mm)."""
    kind = quantization_kind(parts)
    if kind not in TORCHAO_KINDS:
        return
    # deferred: torchao only for precision int8_weight_only / fp8
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, PerRow, quantize_

    # set_inductor_config=False: by default torchao switches inductor's coordinate descent tuning (in
    # all directions) on for the whole process when it quantizes, so every later torch.compile in it
    # tuned each kernel, one configuration at a time, in every direction: the int8 student's
    # static_compile decode step was still in the tuner after 200 s (faulthandler, H200, 2026-12-02
    # 07:08). Loading a model must not change how the rest of the process compiles; the decode step
    # asks for its own tuning (generation.COMPILE_OPTIONS).
    #
    # activation_value_lb: torchao scales each activation row by its largest magnitude / 448 with no
    # floor, so a row of zeros gets the scale 0 and quantizes to 0/0 = NaN. Padding positions are
    # such rows (the padding token's embedding is zero, and so is its first RMSNorm), and attention
    # carries a NaN value to every position of the row (0 weight x NaN = NaN): every padded batch's
    # logits were NaN. The floor (torchao's float8 training's own EPS) leaves every other row's scale.
    if kind == "int8_weight_only":
        config = Int8WeightOnlyConfig(set_inductor_config=False)
    else:
        config = Float8DynamicActivationFloat8WeightConfig(
            granularity=PerRow(), activation_value_lb=FP8_ACTIVATION_AMAX_FLOOR, set_inductor_config=False
        )

    def quantized_linear(module: Any, name: str) -> bool:
        part = part_of(name)
        return isinstance(module, torch.nn.Linear) and part is not None and parts[part].quantized and name != "lm_head"

    quantize_(model, config, filter_fn=quantized_linear)


def repeated_blocks(model: Any) -> Iterator[Any]:
    """The blocks transformers would not split across devices (`_no_split_modules`): the decoder
    layers and the vision blocks, each repeated tens of times with one structure."""
    names = set(getattr(base_model(model), "_no_split_modules", None) or [])
    return (module for module in model.modules() if type(module).__name__ in names)


def compile_blocks(model: Any, memory_budget: float = 1.0, cpp_wrapper: Optional[bool] = None) -> int:
    """hardware.compile: torch.compile each repeated block in place (regional compilation). The
    blocks of one kind share their compiled code, so it compiles in seconds, on the first step,
    with dynamic shapes (batches differ in length); between the blocks it runs eagerly. Inductor
    fuses each block's elementwise work (RMSNorm, rotary embeddings, SwiGLU, casts), cutting the
    kernel launches that leave the GPU idle in eager mode. Returns how many blocks were compiled.

    `memory_budget` (hardware.compile_memory_budget) < 1: the partitioner that splits each block's
    graph into forward and backward keeps only about that share of the activations it would save,
    and the backward recomputes the rest, cheapest first (elementwise work before matrix products),
    inside its own fused kernels: recomputation without the extra launches of gradient
    checkpointing. It is torch's process-wide setting (torch._functorch.config.
    activation_memory_budget), read whenever a block is compiled, which is on first use.

    `cpp_wrapper` (hardware.compile_cpp_wrapper): inductor writes each compiled graph's launcher
    (the code that sizes buffers and launches its kernels) in C++ rather than Python. A compiled
    block's forward or backward launches dozens of kernels; from Python each launch costs host time
    the GPU waits out when the step is bound by the host, as the KD step on an H200 is. None: where
    the model's weights are on a CUDA device (on a CPU the wrapper's own compile costs more than it
    saves)."""
    functorch_config.activation_memory_budget = memory_budget
    blocks = list(repeated_blocks(model))
    if cpp_wrapper is None:
        cpp_wrapper = any(p.device.type == "cuda" for p in model.parameters())
    options = {"cpp_wrapper": True} if cpp_wrapper else None
    for block in blocks:
        block.compile(dynamic=True, options=options)
    return len(blocks)


def model_class(model_type: str) -> Any:
    """transformers' class of a model type the suite pairs."""
    return LlavaOnevisionForConditionalGeneration if model_type == LLAVA_ONEVISION else Qwen2VLForConditionalGeneration


def _random_config(side: ModelSideConfig, processor: Any) -> Any:
    """The architecture of a side, for random weights; special-token ids follow `processor`."""
    architecture = side_architecture(side)
    if side.source == "tiny":
        if architecture == LLAVA_ONEVISION:
            return tiny_llava_config(side.tiny, processor.tokenizer)
        return tiny_model_config(side.tiny, processor.tokenizer)
    if architecture == LLAVA_ONEVISION:
        config = known_llava_config(side.source) if side.source in KNOWN_LLAVA_ONEVISION else _hub_config(side)
        token_id = processor.tokenizer.convert_tokens_to_ids
        config.image_token_index, config.video_token_index = token_id("<image>"), token_id("<video>")
        return config
    if side.source in KNOWN_ARCHITECTURES:
        config = known_config(side.source)
    else:
        config = _hub_config(side)
    tokenizer = processor.tokenizer
    for attr, token in [
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ]:
        setattr(config, attr, tokenizer.convert_tokens_to_ids(token))
    return config


def _hub_config(side: ModelSideConfig) -> Any:
    return AutoConfig.from_pretrained(side.source, revision=side.revision, local_files_only=is_offline())


def _from_pretrained(
    path: str,
    revision: Optional[str],
    dtype: Any,
    quant: Optional[Any],
    device: str,
    attn: str,
    trust_remote_code: bool,
    model_type: str = QWEN2_VL,
) -> Any:
    model, info = model_class(model_type).from_pretrained(
        path,
        revision=revision,
        dtype=dtype,
        quantization_config=quant,
        device_map={"": device},
        attn_implementation=attn,
        local_files_only=is_offline() or os.path.isdir(path),
        trust_remote_code=trust_remote_code,
        use_safetensors=True,  # weights only as safetensors: never unpickle a .bin
        ignore_mismatched_sizes=True,
        output_loading_info=True,  # checked right below, with a clear message
    )
    problem = weights_mismatch(model, info)
    if problem:
        raise FirstSightError(
            f"the weights in {path} do not match its config.json: {problem}. The checkpoint is damaged or "
            "incomplete, or config.json was edited or belongs to another model; save the model again."
        )
    return model


def weights_mismatch(model: Any, info: Dict[str, Any]) -> Optional[str]:
    """What transformers would otherwise initialise at random: tensors of another shape than the
    config's, or tensors missing from the checkpoint (a tied output head aside); None if none."""
    mismatched = list(info.get("mismatched_keys") or [])
    tied = {"lm_head.weight"} if getattr(model.config.get_text_config(), "tie_word_embeddings", False) else set()
    missing = sorted(set(info.get("missing_keys") or []) - tied)
    parts = []
    if mismatched:
        shown = ", ".join(
            f"{k} is {tuple(saved)} in the file, {tuple(wanted)} by the config" for k, saved, wanted in mismatched[:3]
        )
        parts.append(f"{len(mismatched)} tensor(s) of another shape ({shown}{', ...' if len(mismatched) > 3 else ''})")
    if missing:
        parts.append(
            f"{len(missing)} tensor(s) missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
        )
    return "; ".join(parts) or None


def _timed(load: Any) -> Tuple[Any, float]:
    start = time.perf_counter()
    model = load()
    return model, time.perf_counter() - start


def _load_random(config: Any, dtype: Any, quant: Optional[Any], device: str, attn: str) -> Tuple[Any, float]:
    """A random-weight model and the seconds its loading took (initialisation, or for quantized
    models the quantizing load of a temporary checkpoint, whose writing is not counted)."""
    cls = model_class(config.model_type)
    if quant is None:
        with torch.device(device):  # initialise on the target device: minutes faster for 8B on a GPU
            return _timed(lambda: cls._from_config(config, dtype=dtype, attn_implementation=attn))
    # Quantizers act while loading a checkpoint: write the random weights once, load them quantized.
    # They are made on the target device (minutes faster than CPU init at 8B), written, and freed;
    # the GPU's peak counter is then reset so that this scaffolding never counts as the model's cost,
    # nor against a memory budget (hardware.memory_budget_gb: the cap is lifted meanwhile).
    with tempfile.TemporaryDirectory(prefix="firstsight-random-") as tmp:
        with uncapped(device):
            with torch.device(device):
                unquantized = cls._from_config(config, dtype=dtype)
            unquantized.save_pretrained(tmp)
            del unquantized
            if device == "cuda":
                torch.cuda.empty_cache()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return _timed(lambda: _from_pretrained(tmp, None, dtype, quant, device, attn, False, config.model_type))


def _switch_attention(model: Any, hardware: Any) -> None:
    """The attention patches a Qwen2-VL model takes (written for its modules; other models keep theirs)."""
    if model.config.model_type != QWEN2_VL:
        return
    if hardware.batched_vision_attention:
        batch_frames(model)  # the same attention, one SDPA call for all frames of one size
    if hardware.grouped_decode_attention:
        group_decode(model)  # the same attention, decode steps without a per-head copy of the cache


def load_model(spec: ModelSpec, role: str, processor: Any, device: str, frozen: bool) -> LoadedModel:
    """Teacher (frozen: precision dtype + quantization) or student (trainable: precision.trainable_dtype,
    fp32 master weights by default;
    with `lora.enabled` a frozen base in the precision's dtype/quantization plus fp32 adapters).
    `load_time_s` counts loading only, not a tiny model's first-use training."""
    side, precision, hardware = spec.model[role], spec.precision, spec.hardware
    lora = not frozen and spec.lora.enabled
    frozen_weights = frozen or lora
    parts = resolve_parts(precision, role, frozen_weights)  # all float32, unquantized when the weights train
    loaded_dtype = _value(precision.dtype if frozen_weights else precision.trainable_dtype)
    dtype = torch_dtype(loaded_dtype)
    quant = quantization_config(parts)
    attn = hardware.attn_implementation
    if _value(side.weights) == "random":
        torch.manual_seed(spec.seed + (1 if role == "student" else 2))  # each side's init repeatable
        model, load_time = _load_random(_random_config(side, processor), dtype, quant, device, attn)
        origin = f"{side.source} (random weights)"
    elif side.source == "tiny":
        path = tiny_model_dir(spec, role, processor)  # shipped for the defaults, else trained on first use and cached
        kind = side_architecture(side)
        model, load_time = _timed(lambda: _from_pretrained(str(path), None, dtype, quant, device, attn, False, kind))
        origin = str(path)
    else:
        try:
            model, load_time = _timed(
                lambda: _from_pretrained(
                    side.source,
                    side.revision,
                    dtype,
                    quant,
                    device,
                    attn,
                    spec.model.trust_remote_code,
                    side_architecture(side),
                )
            )
        except (OSError, ValueError) as err:
            raise FirstSightError(f"could not load model.{role}.source={side.source!r}: {err}") from err
        origin = side.source
    start = time.perf_counter()
    apply_part_dtypes(model, parts, loaded_dtype)  # parts whose dtype differs from the loaded one
    quantize_after_loading(model, parts)  # torchao kinds; bitsandbytes ones were quantized while loading
    load_time += time.perf_counter() - start
    _switch_attention(model, hardware)
    if frozen:
        model.eval()
        model.requires_grad_(False)
    else:
        if hardware.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if lora:
            model = apply_lora(
                model,
                spec.lora,
                quantized=quant is not None,
                source=side.source,
                gradient_checkpointing=bool(hardware.gradient_checkpointing),
            )
        model.train()
    return LoadedModel(
        model=model,
        role=role,
        origin=origin,
        params_b=model.num_parameters() / 1e9,  # with LoRA: base + adapters
        weights_gb=sum(part_bytes(model).values()) / 1e9,  # get_memory_footprint's count, torchao weights as stored
        load_time_s=load_time,
        vocab_rows=model.get_output_embeddings().weight.shape[0],
        parts=parts,
        part_weights_gb=part_weights_gb(model),
    )


def save_model_atomically(
    model: Any, processor: Any, out_dir: str, extra_files: Optional[Dict[str, str]] = None
) -> None:
    """save_pretrained (safetensors) of model and processor, plus `extra_files` (name → text: run
    record, model card), into a staged directory that replaces `out_dir` whole."""
    with staged_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
