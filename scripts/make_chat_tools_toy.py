"""Write the data and the starting checkpoint of ``experiment=toy_moe_chat_tools``.

    .venv/bin/python scripts/make_chat_tools_toy.py data/chat_tools

``<out>/checkpoint``: a random-init tiny Qwen3-MoE whose tokenizer is character-level in Qwen's chat
format with tool calling (rlpost/toy_checkpoint.py), so ``model.path`` brings the tokenizer and its
template (``env.tokenizer=auto`` is ``hf``). ``<out>/train.jsonl`` and ``<out>/test.jsonl``:
two-digit multiplications ("What is 37*48?", answer 1776) that a tiny model cannot do in its head.
Each record's ``demo`` is a flawed teacher's demonstration in OpenAI format: on 30% of records it
calls the calculator, reads the result and answers ``\\boxed{1776}``; on the other 70% it writes the
right product straight away, which the toy cannot learn to do. After the warm-up the toy mostly
skips the tool and is mostly wrong; RL, paid only for the final answer, has to teach it to call.
"""

from __future__ import annotations

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEACHER_CALLS = 0.3
HELD_OUT = 200


def demo(a: int, b: int, calls: bool) -> list[dict]:
    final = {"role": "assistant", "content": f"\\boxed{{{a * b}}}"}
    if not calls:
        return [final]
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": f"{a}*{b}"}}}
    return [{"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": str(a * b)}, final]


def main(out: str) -> None:
    import torch

    from rlpost.config import ModelConfig
    from rlpost.modeling import Qwen3MoeForCausalLM, save_pretrained
    from rlpost.toy_checkpoint import char_tokenizer_dir

    checkpoint = char_tokenizer_dir(os.path.join(out, "checkpoint"))
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(checkpoint, local_files_only=True))
    cfg = ModelConfig(vocab_size=vocab, max_seq_len=192)
    torch.manual_seed(0)
    save_pretrained(Qwen3MoeForCausalLM(cfg).canonical_state_dict(), cfg, checkpoint)
    rng = random.Random(0)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    for name, part in (("test", pairs[:HELD_OUT]), ("train", pairs[HELD_OUT:])):
        with open(os.path.join(out, f"{name}.jsonl"), "w") as fh:
            for a, b in part:
                fh.write(json.dumps({"prompt": f"What is {a}*{b}?", "answer": str(a * b),
                                     "demo": demo(a, b, rng.random() < TEACHER_CALLS)}) + "\n")
    print(f"{checkpoint}: tokenizer of {vocab} ids; {len(pairs) - HELD_OUT} training and {HELD_OUT} held-out records")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/chat_tools")
