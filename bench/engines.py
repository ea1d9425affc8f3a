"""Native vs vLLM on the same random Qwen3-MoE and the same requests.

Measures, per engine: rollout tokens/s (64 prompts x 64 sampled tokens, after one warm-up call),
in-place weight-update latency (median of 5 versioned updates) against a plain copy of the same
bytes, and the train-inference mismatch: |engine logprob - trainer logprob| over every sampled
token, the trainer being the shared model definition in fp32 (tests/test_modeling.py shows it
equals the DeepSpeed policy to 2e-5). vLLM runs in fp32 and bf16.

    python bench/engines.py                 # ~2 minutes on 2 CPU cores
    python bench/engines.py --quick         # smaller model and batch (a smoke run)

Writes bench/results/engines.json; the last line is ``RESULT engines <vLLM fp32 tokens/s over
native>``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlpost.config import EngineConfig, ModelConfig  # noqa: E402
from rlpost.modeling import Qwen3MoeForCausalLM  # noqa: E402
from rlpost.rollout.engine import GenRequest, make_engine  # noqa: E402


def bench_model(quick: bool) -> ModelConfig:
    if quick:
        return ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                           d_ff=128, num_experts=4, top_k=2, max_seq_len=160, init_std=0.05)
    return ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32,
                       d_ff=256, num_experts=8, top_k=2, max_seq_len=160, init_std=0.05)


def requests(n: int, new_tokens: int, vocab: int) -> list[GenRequest]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = 16 + i % 17
        prompt = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append(GenRequest(prompt, new_tokens, temperature=1.0))
    return out


def trainer_logprobs(model: Qwen3MoeForCausalLM, reqs: list[GenRequest], outs) -> list[float]:
    """The trainer's logprob of every sampled token (fp32, full forward over prompt + response)."""
    diffs = []
    with torch.no_grad():
        for r, o in zip(reqs, outs):
            ids = torch.tensor([r.prompt_ids + o.token_ids])
            logp = torch.log_softmax(model(ids).logits[0, len(r.prompt_ids) - 1:-1].float(), -1)
            ref = logp.gather(-1, torch.tensor(o.token_ids)[:, None]).squeeze(-1)
            diffs += (ref - torch.tensor(o.logprobs)).abs().tolist()
    return diffs


def measure(name: str, dtype: str, cfg: ModelConfig, states: list[dict], reqs, trainer) -> dict:
    engine_cfg = EngineConfig(name=name, dtype=dtype, chunk_tokens=8, max_batch_size=len(reqs))
    t0 = time.perf_counter()
    engine = make_engine(cfg, engine_cfg, eos_id=-1, seed=0)
    start_s = time.perf_counter() - t0
    engine.load_weights(states[0], 0)
    engine.generate(reqs[:8])  # warm-up
    t0 = time.perf_counter()
    outs = engine.generate(reqs)
    gen_s = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    diffs = trainer_logprobs(trainer, reqs, outs)
    updates = []
    for v in range(1, 6):
        t0 = time.perf_counter()
        engine.load_weights(states[v % len(states)], v)
        updates.append(time.perf_counter() - t0)
    del engine
    return {"engine": name, "dtype": dtype, "start_s": round(start_s, 2), "tokens": tokens,
            "gen_s": round(gen_s, 3), "tokens_per_s": round(tokens / gen_s, 1),
            "weight_update_ms": round(1000 * statistics.median(updates), 2),
            "logprob_abs_diff_mean": float(f"{statistics.fmean(diffs):.3g}"),
            "logprob_abs_diff_max": float(f"{max(diffs):.3g}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--engines", default="native,vllm,vllm-bf16")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = bench_model(args.quick)
    n, new_tokens = (16, 16) if args.quick else (64, 64)
    reqs = requests(n, new_tokens, cfg.vocab_size)
    states = []
    for seed in range(2):
        torch.manual_seed(seed)
        states.append(Qwen3MoeForCausalLM(cfg).canonical_state_dict())
    trainer = Qwen3MoeForCausalLM(cfg).eval()
    trainer.load_canonical_state_dict(states[0])
    num_bytes = sum(t.numel() * t.element_size() for t in states[0].values())
    copies = []
    dst = {k: torch.empty_like(v) for k, v in states[0].items()}
    for _ in range(5):
        t0 = time.perf_counter()
        for k, v in states[1].items():
            dst[k].copy_(v)
        copies.append(time.perf_counter() - t0)
    memcpy_ms = 1000 * statistics.median(copies)

    rows = []
    for spec in args.engines.split(","):
        name, _, dt = spec.partition("-")
        dtype = {"": "float32", "bf16": "bfloat16"}[dt]
        row = measure(name, dtype, cfg, states, reqs, trainer)
        row["weight_update_vs_copy"] = round(row["weight_update_ms"] / memcpy_ms, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    native = next(r for r in rows if r["engine"] == "native")
    vllm = next((r for r in rows if r["engine"] == "vllm" and r["dtype"] == "float32"), None)
    ratio = vllm["tokens_per_s"] / native["tokens_per_s"] if vllm else float("nan")
    params = sum(t.numel() for t in states[0].values())
    result = {"device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 torch thread",
              "model": {**vars(cfg), "parameters": params, "bytes": num_bytes},
              "requests": {"count": n, "new_tokens": new_tokens, "temperature": 1.0},
              "plain_copy_ms": round(memcpy_ms, 2), "engines": rows, "vllm_over_native_tokens_per_s": round(ratio, 2)}
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "engines.json")
    if not args.quick:
        with open(out, "w") as fh:
            json.dump(result, fh, indent=2)
    print(f"| engine | dtype | tokens/s | weight update (ms) | vs copy | mean abs logprob diff | max |")
    for r in rows:
        print(f"| {r['engine']} | {r['dtype']} | {r['tokens_per_s']} | {r['weight_update_ms']} | "
              f"{r['weight_update_vs_copy']}x | {r['logprob_abs_diff_mean']} | {r['logprob_abs_diff_max']} |")
    print(f"RESULT engines {ratio:.2f}")


if __name__ == "__main__":
    main()
