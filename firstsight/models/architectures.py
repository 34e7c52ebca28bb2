"""The published Qwen2-VL architectures, embedded so `weights=random` needs no download.

Values are those of the hub's config.json files (Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2-VL-7B-Instruct).
"""

from __future__ import annotations

from typing import Any, Dict

from transformers import Qwen2VLConfig

# Token ids shared by both checkpoints (one tokenizer).
_TOKEN_IDS = dict(
    bos_token_id=151643,
    eos_token_id=151645,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    image_token_id=151655,
    video_token_id=151656,
)


def _qwen2vl(hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, tied: bool) -> Dict[str, Any]:
    return dict(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=28,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            tie_word_embeddings=tied,
        ),
        vision_config=dict(
            depth=32,
            embed_dim=1280,
            num_heads=16,
            mlp_ratio=4,
            hidden_size=hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        tie_word_embeddings=tied,
        **_TOKEN_IDS,
    )


KNOWN_ARCHITECTURES: Dict[str, Dict[str, Any]] = {
    "Qwen/Qwen2-VL-2B-Instruct": _qwen2vl(1536, 8960, 12, 2, 151936, tied=True),
    "Qwen/Qwen2-VL-7B-Instruct": _qwen2vl(3584, 18944, 28, 4, 152064, tied=False),
}
KNOWN_ARCHITECTURES["Qwen/Qwen2-VL-2B"] = KNOWN_ARCHITECTURES["Qwen/Qwen2-VL-2B-Instruct"]
KNOWN_ARCHITECTURES["Qwen/Qwen2-VL-7B"] = KNOWN_ARCHITECTURES["Qwen/Qwen2-VL-7B-Instruct"]


def known_config(source: str):
    """A Qwen2VLConfig of a known hub id, built offline."""
    return Qwen2VLConfig(**KNOWN_ARCHITECTURES[source])
