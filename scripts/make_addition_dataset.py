"""Write a toy JSONL dataset for ``env=dataset`` (README "Your own data"): 1-2 digit additions as
records ``{"question", "answer", "solution"}``, where ``solution`` is a flawed teacher's worked
answer (it drops the carry on 80% of carrying additions, like ``toy_moe_local``'s warm-up) that
ends in GSM8K's ``#### <answer>`` marker, so the ``math`` verifier reads the committed answer.

    python scripts/make_addition_dataset.py data/additions   # writes train.jsonl and test.jsonl
"""

from __future__ import annotations

import json
import os
import random
import sys


def carry_free_sum(a: int, b: int) -> int:
    out, place = 0, 1
    while a or b:
        out += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return out


def main(folder: str, carry_error: float = 0.8, held_out: int = 200) -> None:
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(0).shuffle(pairs)
    teacher = random.Random(1)
    os.makedirs(folder, exist_ok=True)
    for name, chunk in (("test.jsonl", pairs[:held_out]), ("train.jsonl", pairs[held_out:])):
        with open(os.path.join(folder, name), "w") as fh:
            for a, b in chunk:
                shown = a + b
                if carry_free_sum(a, b) != a + b and teacher.random() < carry_error:
                    shown = carry_free_sum(a, b)
                fh.write(json.dumps({"question": f"{a}+{b}", "answer": str(a + b), "solution": f"#### {shown}"}) + "\n")
    print(f"wrote {folder}/train.jsonl ({len(pairs) - held_out}) and {folder}/test.jsonl ({held_out})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
