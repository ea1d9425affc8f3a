"""Toy Hugging Face checkpoints in a real chat format, for local runs and tests.

No package ships Qwen's tokenizer files, and a tiny model cannot learn a 150k-id vocabulary on a
CPU in minutes. :func:`char_tokenizer_dir` writes a real ``tokenizer.json`` folder that is both:
character-level (printable ASCII and newline, one id each, ~100 ids) with Qwen's chat tokens added
as Qwen's tokenizer has them (``<|im_start|>``/``<|im_end|>`` special; ``<tool_call>``,
``</tool_call>``, ``<tool_response>``, ``</tool_response>`` added, non-special), eos ``<|im_end|>``,
and a chat template that renders system, user, assistant (with ``tool_calls``) and tool turns and
the tools as Qwen2.5-Instruct's and Qwen3's templates do (:data:`QWEN_TOOLS_TEMPLATE`; the
thinking parts left out; :data:`COMPACT_TOOLS_TEMPLATE` lists the tools by name only, so prompts
stay short). rlpost treats it like any checkpoint's tokenizer (``env.tokenizer=hf``).
"""

from __future__ import annotations

QWEN_TOOLS_TEMPLATE = (
    "{%- if tools %}"
    "{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{ '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{%- endfor %}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{ '<|im_start|>assistant' }}"
    "{%- if message.content %}{{ '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls | default([]) %}"
    "{%- set tc = tool_call.function if tool_call.function is defined else tool_call %}"
    "{{ '\\n<tool_call>\\n{\"name\": \"' + tc.name + '\", \"arguments\": ' }}"
    "{%- if tc.arguments is string %}{{ tc.arguments }}{%- else %}{{ tc.arguments | tojson }}{%- endif %}"
    "{{ '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{%- endif %}"
    "{{ '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

# (content, special) as in Qwen2.5's and Qwen3's tokenizer.json
QWEN_ADDED = [("<|im_start|>", True), ("<|im_end|>", True), ("<tool_call>", False), ("</tool_call>", False),
              ("<tool_response>", False), ("</tool_response>", False)]


# A compact template in the same format (tools listed by name only) for the toy runs, where every
# prompt character is a token the tiny model reads
COMPACT_TOOLS_TEMPLATE = QWEN_TOOLS_TEMPLATE.replace(
    "{{ '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{%- endfor %}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}",
    "{{ 'Tools:' }}{%- for tool in tools %}{{ ' ' + tool.function.name }}{%- endfor %}{{ '<|im_end|>\\n' }}")


def char_tokenizer_dir(folder, template: str = COMPACT_TOOLS_TEMPLATE) -> str:
    """A character-level Hugging Face tokenizer (printable ASCII and newline, one id each) with
    Qwen's chat tokens added and ``template``: a real ``tokenizer.json`` folder whose vocabulary
    (~100 ids) a tiny model learns in seconds."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>", "\n", *[chr(c) for c in range(32, 127)]]
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.add_tokens([c for c, special in QWEN_ADDED if not special])
    fast.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                             "additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = template
    fast.save_pretrained(str(folder))
    return str(folder)
