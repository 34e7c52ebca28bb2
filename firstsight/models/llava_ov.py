"""A teacher of another architecture: LLaVA-OneVision (EgoGPT's base), with its own processor.

LLaVA-OneVision pairs a Qwen2 language model with a SigLIP vision tower. Its tokenizer is Qwen2's
with `<image>` and `<video>` added, so every answer token (plain text and the closing
<|im_end|>) has the same id as under the student's Qwen2-VL tokenizer; only the visual tokens
differ. Each model therefore gets the sample through its own processor (its own image tokens,
resolution and chat template) and the distillation compares the two on the answer tokens
(firstsight/kd/paired.py).

The embedded tiny LLaVA-OneVision is built offline over the tiny Qwen2-VL's tokenizer, with the two
tokens appended (ids after the student's, so the shared ids stay the same), the stock
LLaVA-OneVision image processor and the chat format of the published checkpoints:
`<|im_start|>user\\n<image>...question<|im_end|>\\n<|im_start|>assistant\\nanswer<|im_end|>\\n`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from transformers import (
    AutoProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
)

from firstsight.core.files import cached_dir, content_key
from firstsight.models.tiny import tiny_processor

QWEN2_VL = "qwen2_vl"
LLAVA_ONEVISION = "llava_onevision"
MODEL_TYPES = (QWEN2_VL, LLAVA_ONEVISION)  # the architectures a side can have (config.json's model_type)

VISUAL_TOKENS = ["<image>", "<video>"]
# The published checkpoints' chat format (llava-hf/llava-onevision-qwen2-7b-ov-hf): images first,
# then the text, each turn closed by <|im_end|>; the assistant header is Qwen2-VL's "assistant\n",
# so an answer is tokenized in the same context on both sides.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'video' %}<video>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_IMAGE_SIZE = 112  # the synthetic frames' size: one tile, no any-resolution crops
TINY_PATCH_SIZE = 28  # 4 x 4 patches a frame: short sequences for the CPU
REAL_IMAGE_SIZE = 384  # SigLIP-so400m's input, the published checkpoints'
REAL_PATCH_SIZE = 14


def tiny_llava_processor(cache_dir: str | Path, real: bool = False) -> Any:
    """The offline LlavaOnevisionProcessor over the tiny tokenizer, built on first use and cached:
    one 112-pixel tile of 4 x 4 patches a frame; `real`: the published checkpoints' image
    processor (384-pixel tiles of 27 x 27 patches, any resolution up to 3 x 3 tiles), the stand-in
    processor of a random-weight LLaVA-OneVision-7B, cutting frames into as many visual tokens."""
    key = content_key("llava-ov-processor-v1", VISUAL_TOKENS, CHAT_TEMPLATE, real, TINY_IMAGE_SIZE, TINY_PATCH_SIZE)
    path = cached_dir(
        Path(cache_dir) / f"tiny-llava-processor-{key}",
        lambda out: _build_processor(out, tiny_processor(cache_dir).tokenizer, real),
    )
    return AutoProcessor.from_pretrained(str(path), local_files_only=True)


def _build_processor(out_dir: Path, tokenizer: Any, real: bool) -> Dict[str, Any]:
    shared = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": VISUAL_TOKENS})
    if real:
        image, video = LlavaOnevisionImageProcessor(), LlavaOnevisionVideoProcessor()
        tokens, aspect = (REAL_IMAGE_SIZE // REAL_PATCH_SIZE) ** 2, LLAVA_ONEVISION_7B["vision_aspect_ratio"]
    else:
        side = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
        pinpoints = [[TINY_IMAGE_SIZE] * 2]
        image = LlavaOnevisionImageProcessor(size=side, crop_size=side, image_grid_pinpoints=pinpoints)
        video = LlavaOnevisionVideoProcessor(size=side)
        tokens, aspect = (TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2, "anyres_max_1"
    processor = LlavaOnevisionProcessor(
        image_processor=image,
        video_processor=video,
        tokenizer=tokenizer,
        num_image_tokens=tokens,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(out_dir))
    return {"shared_tokens": shared, "vocab_size": len(tokenizer)}


def tiny_llava_config(arch: Any, tokenizer: Any) -> Any:
    """A LlavaOnevisionConfig of the given tiny sizes over `tokenizer` (rows padded like the real models)."""
    rows = -(-len(tokenizer) // arch.vocab_padding) * arch.vocab_padding
    token_id = tokenizer.convert_tokens_to_ids
    return LlavaOnevisionConfig(
        text_config=dict(
            model_type="qwen2",
            vocab_size=rows,
            hidden_size=arch.hidden_size,
            intermediate_size=arch.intermediate_size,
            num_hidden_layers=arch.num_layers,
            num_attention_heads=arch.num_heads,
            num_key_value_heads=arch.num_kv_heads,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            bos_token_id=token_id("<|endoftext|>"),
            eos_token_id=token_id("<|im_end|>"),
            pad_token_id=token_id("<|endoftext|>"),
        ),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=arch.vision_embed_dim,
            intermediate_size=2 * arch.vision_embed_dim,
            num_hidden_layers=arch.vision_depth,
            num_attention_heads=arch.vision_heads,
            image_size=TINY_IMAGE_SIZE,
            patch_size=TINY_PATCH_SIZE,
            vision_use_head=False,  # the published checkpoints' tower has no pooling head
        ),
        image_token_index=token_id("<image>"),
        video_token_index=token_id("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[TINY_IMAGE_SIZE] * 2],
        vision_aspect_ratio="anyres_max_1",
        tie_word_embeddings=False,
    )


def answer_vocabulary_mismatch(student_tokenizer: Any, teacher_tokenizer: Any) -> Optional[str]:
    """Why token-level KD between the two is undefined, or None: every token of the student's
    vocabulary but its added special tokens (the visual ones differ by design), and the closing
    <|im_end|>, must have the same id under the teacher's tokenizer."""
    added = set(student_tokenizer.get_added_vocab())
    teacher_vocab = teacher_tokenizer.get_vocab()
    differ = [
        tok
        for tok, i in student_tokenizer.get_vocab().items()
        if (tok not in added or tok == "<|im_end|>") and teacher_vocab.get(tok) != i
    ]
    if not differ:
        return None
    example = differ[0]
    return (
        f"{len(differ)} of the student's tokens have another id under the teacher's tokenizer (e.g. {example!r}: "
        f"{student_tokenizer.get_vocab()[example]} vs {teacher_vocab.get(example)})"
    )


# llava-hf/llava-onevision-qwen2-7b-ov-hf's config.json, embedded so `weights=random` builds it
# offline: Qwen2-7B (152,128 output rows) over SigLIP-so400m at 384 px, any-resolution up to 3 x 3 tiles.
LLAVA_ONEVISION_7B: Dict[str, Any] = dict(
    text_config=dict(
        model_type="qwen2",
        vocab_size=152128,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    vision_config=dict(
        model_type="siglip_vision_model",
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=26,
        num_attention_heads=16,
        image_size=REAL_IMAGE_SIZE,
        patch_size=REAL_PATCH_SIZE,
        vision_use_head=False,
    ),
    image_token_index=151646,
    video_token_index=151647,
    projector_hidden_act="gelu",
    vision_feature_layer=-1,
    vision_feature_select_strategy="full",
    vision_aspect_ratio="anyres_max_9",
    tie_word_embeddings=False,
)
KNOWN_LLAVA_ONEVISION = {
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": LLAVA_ONEVISION_7B,
    "llava-hf/llava-onevision-qwen2-7b-si-hf": LLAVA_ONEVISION_7B,
}


def known_llava_config(source: str) -> Any:
    """A LlavaOnevisionConfig of a known hub id, built offline."""
    return LlavaOnevisionConfig(**KNOWN_LLAVA_ONEVISION[source])
