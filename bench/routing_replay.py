"""Rollout routing replay (R3): how much of the train-inference logprob mismatch it removes.

An engine samples responses from a random Qwen3-MoE and reports, for every sampled token, its
logprob and the experts each layer routed it through. The trainer's forward (the shared model
definition in fp32, the trainer's precision on CPU; tests/test_modeling.py shows the DeepSpeed
policy computes the same function, replay included) then scores the same tokens twice: with
its own router, and replaying the engine's experts. Tokens whose expert set differs in some
layer ("rerouted") are where the router, not the arithmetic, makes the gap.

Measured per engine: the share of rerouted tokens, mean and max |engine logprob - trainer
logprob| over all, rerouted and other tokens, with and without replay. The fp32 native engine
is the control (same arithmetic as the trainer up to batching: almost nothing rerouted); bf16 is
what a GPU engine runs.

    python bench/routing_replay.py            # ~30 s on 2 CPU cores (3 seeds)
    python bench/routing_replay.py --device cuda --engines native-bf16,sglang-bf16

Writes bench/results/routing_replay[_gpu].json; last line ``RESULT routing_replay <mean gap on
rerouted tokens without replay / with replay>`` for the first bf16 engine, the median over
``--seeds`` model initialisations (3).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.engines import bench_model, requests  # noqa: E402
from rlpost.config import EngineConfig  # noqa: E402
from rlpost.modeling import Qwen3MoeForCausalLM  # noqa: E402
from rlpost.rollout.engine import make_engine  # noqa: E402


def trainer_view(model: Qwen3MoeForCausalLM, prompt: list[int], out, replay: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprob of each sampled token, whether the trainer's router chose another expert set
    than the engine for it in some layer)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + out.token_ids], device=device)
    p, n = len(prompt), len(out.token_ids)
    engine_experts = torch.as_tensor(out.routed_experts, device=device, dtype=torch.long)  # (n, layers, k)
    experts = None
    if replay:  # position p-1+i routed the hidden state that sampled token i
        experts = torch.full((1, ids.shape[1], *engine_experts.shape[1:]), -1, dtype=torch.long, device=device)
        experts[0, p - 1:p - 1 + n] = engine_experts
    with torch.no_grad():
        res = model(ids, replay_experts=experts)
    logp = torch.log_softmax(res.logits[0, p - 1:p - 1 + n].float(), -1)
    logp = logp.gather(-1, ids[0, p:, None]).squeeze(-1)
    own = res.routed_experts[0, p - 1:p - 1 + n].sort(-1).values
    rerouted = (own != engine_experts.sort(-1).values).any(-1).any(-1)
    return logp.cpu(), rerouted.cpu()


def stats(gap: torch.Tensor) -> dict:
    if gap.numel() == 0:
        return {"mean": None, "max": None}
    return {"mean": float(f"{float(gap.mean()):.4g}"), "max": float(f"{float(gap.max()):.4g}")}


def measure(name: str, dtype: str, cfg, state: dict, reqs, model: Qwen3MoeForCausalLM, device: str) -> dict:
    engine_cfg = EngineConfig(name=name, dtype=dtype, max_batch_size=len(reqs), return_routed_experts=True,
                              num_gpus=1 if device == "cuda" else 0)
    engine = make_engine(cfg, engine_cfg, eos_id=-1, seed=0, device=device)
    engine.load_weights(state, 0)
    outs = engine.generate(reqs)
    del engine
    if any(o.routed_experts is None or len(o.routed_experts) != len(o.token_ids) for o in outs):
        raise RuntimeError(f"{name} {dtype}: the engine did not report every token's experts")
    row: dict = {"engine": name, "dtype": dtype}
    engine_logp = torch.cat([torch.tensor(o.logprobs) for o in outs])
    for replay in (False, True):
        views = [trainer_view(model, r.prompt_ids, o, replay) for r, o in zip(reqs, outs)]
        gap = (torch.cat([v[0] for v in views]) - engine_logp).abs()
        if not replay:  # rerouted: judged by the trainer's own router, the same in both passes
            rerouted = torch.cat([v[1] for v in views])
            row["tokens"] = int(gap.numel())
            row["rerouted_frac"] = round(float(rerouted.float().mean()), 4)
        key = "replay" if replay else "own_router"
        row[key] = {"all": stats(gap), "rerouted": stats(gap[rerouted]), "other": stats(gap[~rerouted])}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="native,native-bf16", help="engine[-bf16] list (native, sglang)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--name", default=None, help="results file name (default routing_replay[_gpu])")
    parser.add_argument("--seeds", type=int, default=3, help="model initialisations measured (the spread)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = bench_model(quick=False)
    reqs = requests(args.prompts, args.new_tokens, cfg.vocab_size)
    rows = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(cfg).to(args.device).eval()
        state = {k: v.to(args.device) for k, v in model.canonical_state_dict().items()}
        for spec in args.engines.split(","):
            engine, _, dt = spec.partition("-")
            row = {"seed": seed, **measure(engine, {"": "float32", "bf16": "bfloat16"}[dt], cfg, state, reqs, model,
                                           args.device)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    where = (f"GPU: {torch.cuda.get_device_name(0)}" if args.device == "cuda" else
             f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    # the headline: the first bf16 engine's gap on rerouted tokens, own router over replay, per seed
    first_bf16 = next((f"{r['engine']}-bf16" for r in rows if r["dtype"] == "bfloat16"), None)
    ratios = sorted(r["own_router"]["rerouted"]["mean"] / max(r["replay"]["rerouted"]["mean"], 1e-12)
                    for r in rows if f"{r['engine']}-bf16" == first_bf16 and r["dtype"] == "bfloat16"
                    and r["replay"]["rerouted"]["mean"])
    ratio = statistics.median(ratios) if ratios else float("nan")
    name = args.name or "routing_replay" + ("_gpu" if args.device == "cuda" else "")
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}.json"), "w") as fh:
        json.dump({"device": where, "model": vars(cfg), "requests": {"count": args.prompts,
                   "new_tokens": args.new_tokens, "temperature": 1.0}, "trainer": "fp32", "seeds": args.seeds,
                   "engines": rows, "rerouted_gap_ratios": [round(x, 2) for x in ratios],
                   "rerouted_gap_ratio_median": round(ratio, 2)}, fh, indent=2)
    print("| seed | engine | dtype | rerouted tokens | mean gap, own router (rerouted / other) | with replay (rerouted / other) |")
    for r in rows:
        o, p = r["own_router"], r["replay"]
        print(f"| {r['seed']} | {r['engine']} | {r['dtype']} | {100 * r['rerouted_frac']:.2f}% | {o['all']['mean']} "
              f"({o['rerouted']['mean']} / {o['other']['mean']}) | {p['all']['mean']} "
              f"({p['rerouted']['mean']} / {p['other']['mean']}) |")
    print(f"median of {len(ratios)} seeds (min {min(ratios, default=float('nan')):.2f}, "
          f"max {max(ratios, default=float('nan')):.2f})")
    print(f"RESULT routing_replay {ratio:.2f}")


if __name__ == "__main__":
    main()
