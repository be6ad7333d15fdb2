"""Write the tiny multimodal (and Gemma-3 text) fixture configs in tests/fixtures/configs.

Each config is built by transformers' own config classes (``Gemma3Config``, ``Mistral3Config``,
``Gemma3TextConfig``) with small sizes, and saved as the diff against the class defaults, the way
``save_pretrained`` writes a config.json. Nothing here is a number of a real model: the structure
(vision tower, projector, language model, sliding/global layer pattern) is the class's own.

    python scripts/make_multimodal_fixtures.py   # rewrites the three files
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "configs"

#: shared small sizes of the language models
TEXT = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)


def gemma3_text():
    from transformers import Gemma3TextConfig

    # 3 layers with a sliding-window pattern of 3: two local layers, then one global
    return Gemma3TextConfig(**{**TEXT, "num_hidden_layers": 3}, sliding_window=8, query_pre_attn_scalar=16,
                            sliding_window_pattern=3)


def gemma3_mm():
    from transformers import Gemma3Config, SiglipVisionConfig

    # 32 px images of 8 px patches: 4x4 patches, pooled to mm_tokens_per_image = 4 (2x2)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8, vision_use_head=False)
    return Gemma3Config(text_config=gemma3_text(), vision_config=vision, mm_tokens_per_image=4,
                        boi_token_index=997, eoi_token_index=998, image_token_index=999)


def mistral3_mm():
    from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig

    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 head_dim=16, image_size=32, patch_size=8)
    text = MistralConfig(**TEXT, sliding_window=None)
    return Mistral3Config(text_config=text, vision_config=vision, image_token_index=999, spatial_merge_size=2)


def _write(name: str, config) -> None:
    d = config.to_diff_dict()
    d.pop("transformers_version", None)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(path)


def main() -> None:
    _write("gemma3-text", gemma3_text())
    _write("gemma3-mm", gemma3_mm())
    _write("mistral3-mm", mistral3_mm())


if __name__ == "__main__":
    main()
