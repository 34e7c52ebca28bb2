"""The embedded tiny Qwen2-VL: an offline tokenizer/processor and small model configs.

Nothing here downloads: the tokenizer is a byte-level BPE trained on the synthetic data's text,
carrying Qwen2-VL's special tokens and chat format, and wrapped with the stock Qwen2-VL image and
video processors into a real `Qwen2VLProcessor`. It is built once per cache directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from firstsight.core.files import cached_dir, content_key
from firstsight.data.synthetic import SyntheticEgoQA

TOKENIZER_RECIPE = "bpe-v1"
BPE_VOCAB_SIZE = 512
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen2-VL's chat format (text and images; each image is one <|image_pad|> the processor expands).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Frames larger than this are downscaled by the processor; 224² keeps the tiny models' sequences short.
MAX_PIXELS = 224 * 224
MIN_PIXELS = 56 * 56


def tiny_processor(cache_dir: str | Path) -> Any:
    """The offline Qwen2VLProcessor, built on first use and cached."""
    key = content_key(TOKENIZER_RECIPE, BPE_VOCAB_SIZE, SPECIAL_TOKENS, CHAT_TEMPLATE, MIN_PIXELS, MAX_PIXELS)
    path = cached_dir(Path(cache_dir) / f"tiny-processor-{key}", _build_processor)
    return AutoProcessor.from_pretrained(str(path), local_files_only=True)


def _build_processor(out_dir: Path) -> dict:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
        show_progress=False,
    )
    corpus = SyntheticEgoQA.text_corpus() + ["user", "assistant", "system"]
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )
    sizes = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes),
        video_processor=Qwen2VLVideoProcessor(**sizes),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(out_dir))
    return {"vocab_size": len(tokenizer), "recipe": TOKENIZER_RECIPE}


def mrope_section(head_dim: int) -> list[int]:
    """Split half the head size over (time, height, width) in Qwen2-VL's 16:24:24 proportion."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def tiny_model_config(arch: Any, tokenizer: Any) -> Any:
    """A Qwen2VLConfig of the given tiny sizes over `tokenizer` (output rows padded like the real models)."""
    rows = -(-len(tokenizer) // arch.vocab_padding) * arch.vocab_padding
    token_id = tokenizer.convert_tokens_to_ids
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=rows,
            hidden_size=arch.hidden_size,
            intermediate_size=arch.intermediate_size,
            num_hidden_layers=arch.num_layers,
            num_attention_heads=arch.num_heads,
            num_key_value_heads=arch.num_kv_heads,
            max_position_embeddings=4096,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": mrope_section(arch.hidden_size // arch.num_heads),
            },
            bos_token_id=token_id("<|endoftext|>"),
            eos_token_id=token_id("<|im_end|>"),
            pad_token_id=token_id("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=arch.vision_depth,
            embed_dim=arch.vision_embed_dim,
            num_heads=arch.vision_heads,
            hidden_size=arch.hidden_size,  # the merger projects into the text width
            mlp_ratio=2,
        ),
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        bos_token_id=token_id("<|endoftext|>"),
        eos_token_id=token_id("<|im_end|>"),
        pad_token_id=token_id("<|endoftext|>"),
    )
