"""The native torch inference engine: batched sampling with a KV cache, for small models.

Prompts (plus any resumed prefix) are left-padded into one batch and prefilled once; decoding
then appends one token per step to the cache. Every ``chunk_tokens`` steps the caller's
``should_stop`` is polled: that is where APRIL stops a round and where a worker swaps weights.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rlpost.config import EngineConfig, ModelConfig
from rlpost.modeling import CausalSelfAttention, Embeddings, ExpertMLP, KVCache, init_weights, topk_route
from rlpost.rollout.engine import GenOutput, GenRequest, OnFinished, ShouldStop

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RoutedMoE(nn.Module):
    """MoE FFN that routes tokens itself and reports each token's experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k = cfg.top_k
        self.gate = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(ExpertMLP(cfg.d_model, cfg.d_ff) for _ in range(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        experts, weights = topk_route(flat, self.gate.weight, self.k)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.nonzero(experts == e, as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None].to(flat.dtype))
        return out.view(shape), experts.view(*shape[:-1], self.k)


class InferenceBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.moe = RoutedMoE(cfg)

    def forward(self, x, attn_mask, cache, layer):
        x = x + self.attn(self.ln1(x), attn_mask, cache, layer)
        out, experts = self.moe(self.ln2(x))
        return x + out, experts


class ToyMoEForInference(nn.Module):
    """Same function and canonical weight names as the trainer's DeepSpeed model."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(cfg)
        self.layers = nn.ModuleList(InferenceBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.init_std, cfg.n_layers)

    def forward(self, ids, positions, attn_mask, cache):
        """Returns logits (B, T, V) and routed experts (B, T, n_layers, k)."""
        x = self.embed(ids, positions)
        routed = []
        for i, block in enumerate(self.layers):
            x, experts = block(x, attn_mask, cache, i)
            routed.append(experts)
        cache.length += ids.shape[1]
        return self.head(self.ln_f(x)), torch.stack(routed, dim=2)


def _sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; returns (ids, logprobs under the sampling temperature).
    Rows with temperature 0 are greedy and report the untempered logprob."""
    greedy = temperature <= 0
    scaled = logits.float() / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    logp = F.log_softmax(scaled, dim=-1)
    probs = logp.exp()
    if bool((top_p < 1).any()):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < top_p[:, None]
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    ids = torch.where(greedy, logits.argmax(-1), sampled)
    return ids, logp.gather(-1, ids[:, None]).squeeze(-1)


class NativeEngine:
    """Batched KV-cache generation for a torch causal LM with ToyMoEForInference's interface."""

    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, eos_id: int,
                 pad_id: int = 0, device: str = "cpu", seed: int = 0):
        self.model_cfg = model_cfg
        self.cfg = engine_cfg
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.device = torch.device(device)
        self.dtype = _DTYPES[engine_cfg.dtype]
        self.model = ToyMoEForInference(model_cfg).to(self.device, self.dtype).eval()
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._version = -1

    @property
    def version(self) -> int:
        return self._version

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(f"weights v{version} do not fit the engine's model: missing={missing[:5]} "
                             f"unexpected={unexpected[:5]}")
        self._version = version

    @torch.inference_mode()
    def generate(self, requests: list[GenRequest], should_stop: ShouldStop | None = None,
                 on_finished: OnFinished | None = None) -> list[GenOutput]:
        outputs: list[GenOutput] = []
        step = self.cfg.max_batch_size
        for i in range(0, len(requests), step):
            shifted = None if on_finished is None else (lambda j, out, base=i: on_finished(base + j, out))
            outputs.extend(self._generate_batch(requests[i:i + step], should_stop, shifted))
            if should_stop is not None and any(o.finish_reason == "abort" for o in outputs):
                for j in range(len(outputs), len(requests)):  # later sub-batches never started
                    outputs.append(GenOutput([], [], None, "abort"))
                    if on_finished is not None:
                        on_finished(j, outputs[-1])
                break
        return outputs

    def _prefill(self, reqs: list[GenRequest]):
        b = len(reqs)
        inputs = [list(r.prompt_ids) + list(r.prefix_ids) for r in reqs]
        budget = [r.max_new_tokens for r in reqs]
        if min(budget) <= 0:
            raise ValueError("GenRequest.max_new_tokens must be > 0")
        plen = max(len(x) for x in inputs)
        # Positions are per row, so each row must fit the model; the cache (lock-step columns
        # after left padding) needs the longest input plus the largest remaining budget.
        for x, n in zip(inputs, budget):
            if len(x) + n > self.model_cfg.max_seq_len:
                raise ValueError(f"prompt+prefix ({len(x)}) + max_new_tokens ({n}) exceeds "
                                 f"model.max_seq_len={self.model_cfg.max_seq_len}")
        capacity = plen + max(budget)
        ids = torch.full((b, plen), self.pad_id, dtype=torch.long, device=self.device)
        valid = torch.zeros((b, capacity), dtype=torch.bool, device=self.device)
        pad = torch.tensor([plen - len(x) for x in inputs], device=self.device)
        for row, x in enumerate(inputs):
            ids[row, plen - len(x):] = torch.tensor(x, device=self.device)
            valid[row, plen - len(x):plen] = True
        positions = (torch.arange(plen, device=self.device)[None, :] - pad[:, None]).clamp_min(0)
        cache = KVCache.allocate(self.model_cfg, b, capacity, self.dtype, self.device)
        causal = torch.ones(plen, plen, dtype=torch.bool, device=self.device).tril()
        mask = (causal[None] & valid[:, None, :plen])[:, None]
        logits, routed = self.model(ids, positions, mask, cache)
        return cache, valid, logits[:, -1], routed[:, -1], positions[:, -1] + 1

    def _generate_batch(self, reqs: list[GenRequest], should_stop: ShouldStop | None,
                        on_finished: OnFinished | None) -> list[GenOutput]:
        b = len(reqs)
        cache, valid, last_logits, last_routed, next_pos = self._prefill(reqs)
        temperature = torch.tensor([r.temperature for r in reqs], device=self.device, dtype=torch.float32)
        top_p = torch.tensor([r.top_p for r in reqs], device=self.device, dtype=torch.float32)
        stop_sets = [set(r.stop_ids) | {self.eos_id} for r in reqs]
        budget = [r.max_new_tokens for r in reqs]
        tokens: list[list[int]] = [[] for _ in range(b)]
        logps: list[list[float]] = [[] for _ in range(b)]
        experts: list[list[np.ndarray]] = [[] for _ in range(b)]
        reason = [""] * b
        active = list(range(b))  # original row of each batch row still decoding
        outputs: list[GenOutput | None] = [None] * b

        def finish(row: int) -> None:
            outputs[row] = GenOutput(tokens[row], logps[row],
                                     np.stack(experts[row]) if experts[row] else None, reason[row])
            if on_finished is not None:
                on_finished(row, outputs[row])

        t = 0
        while active:
            new_ids, new_logps = _sample(last_logits, temperature, top_p, self.generator)
            new_list, lp_list = new_ids.tolist(), new_logps.tolist()
            routed_np = last_routed.to(torch.int16).cpu().numpy()
            for i, row in enumerate(active):
                if reason[row]:  # finished earlier in this chunk; leaves the batch at the boundary
                    continue
                tokens[row].append(new_list[i])
                logps[row].append(lp_list[i])
                experts[row].append(routed_np[i])
                if new_list[i] in stop_sets[row]:
                    reason[row] = "stop"
                elif len(tokens[row]) >= budget[row]:
                    reason[row] = "length"
            t += 1
            at_boundary = t % self.cfg.chunk_tokens == 0
            if at_boundary or all(reason[row] for row in active):
                keep = [i for i, row in enumerate(active) if not reason[row]]
                for i, row in enumerate(active):
                    if reason[row]:
                        finish(row)
                if not keep:
                    break
                if len(keep) < len(active):  # compaction: finished rows leave the batch and the cache
                    index = torch.tensor(keep, device=self.device)
                    active = [active[i] for i in keep]
                    cache = cache.select(index)
                    valid, new_ids, next_pos = valid[index], new_ids[index], next_pos[index]
                    temperature, top_p = temperature[index], top_p[index]
                if at_boundary and should_stop is not None and should_stop():
                    for row in active:
                        reason[row] = "abort"
                        finish(row)
                    break
            valid[:, cache.length] = True
            mask = valid[:, None, None, :cache.length + 1]
            logits, routed = self.model(new_ids[:, None], next_pos[:, None], mask, cache)
            last_logits, last_routed = logits[:, -1], routed[:, -1]
            next_pos = next_pos + 1
        return outputs  # type: ignore[return-value]
