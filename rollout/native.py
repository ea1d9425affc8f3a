"""The native torch inference engine: continuous batching with a KV cache, for small models.

Rows share one KV cache in lock-step columns (left-padded, per-row positions). One ``step()``
decodes ``chunk_tokens`` tokens per row (where the caller polls for an APRIL cut or new weights),
finished rows leave the batch, and submitted requests are prefilled into the freed rows at the
next step. With ``engine.reuse_kv`` an aborted row's KV is kept and a resumed request continues
from it instead of prefilling its tokens again.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rlpost.config import EngineConfig, ModelConfig
from rlpost.modeling import KVCache, Qwen3MoeForCausalLM
from rlpost.rollout.engine import EngineBase, GenOutput, GenRequest

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; returns (ids, logprobs under the sampling temperature).
    Rows with temperature 0 are greedy and report the untempered logprob. Every pass over the
    vocabulary counts on a CPU (256 rows x 32k ids: ~10 ms each), so only the ones a batch
    needs are made: no scaling at temperature 1, an argmax only for greedy rows, one
    log-softmax for both the probabilities and the chosen tokens' logprobs."""
    greedy = temperature <= 0
    scaled = logits.float()
    if bool((temperature != 1).any()):
        scaled = scaled * torch.where(greedy, torch.ones_like(temperature), 1.0 / temperature)[:, None]
    logp = F.log_softmax(scaled, dim=-1)  # one fused pass (logsumexp + subtract takes three)
    probs = logp.exp()
    if bool((top_p < 1).any()):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < top_p[:, None]
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    ids = _inverse_cdf(probs, generator)
    if bool(greedy.any()):
        ids = torch.where(greedy, scaled.argmax(-1), ids)
    return ids, logp.gather(-1, ids[:, None]).squeeze(-1)


def _inverse_cdf(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One categorical draw per row from (unnormalised) ``probs``, by inverse-CDF: one uniform
    number per row. ``torch.multinomial`` (and the exponential-race trick GPU samplers use)
    draws one random number per vocabulary entry, which on a CPU costs more than the whole
    forward pass: 190 ms for 256 rows of a 32k vocabulary on one thread, against ~10 ms here.
    ``right=True`` and ``u < total`` only ever pick an entry of positive probability."""
    cdf = probs.cumsum_(-1)  # in place: the caller has no further use for probs
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=probs.dtype) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


class NativeEngine(EngineBase):
    """Batched KV-cache generation for the shared Qwen3-MoE definition (its routing MoE block).

    Continuous batching: at most ``max_batch_size`` rows decode at once; a request submitted
    while the batch runs is prefilled into a free row at the start of the next step and merged
    into the running batch's KV cache, so one long sample never holds a batch of short ones
    hostage."""

    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, eos_id: int,
                 pad_id: int = 0, device: str = "cpu", seed: int = 0):
        self.model_cfg = model_cfg
        self.cfg = engine_cfg
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.device = torch.device(device)
        self.dtype = _DTYPES[engine_cfg.dtype]
        self.model = Qwen3MoeForCausalLM(model_cfg).to(self.device, self.dtype).eval()
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._version = -1
        # cache_key -> KV of a stopped sample (engine.reuse_kv), oldest first, bounded
        self.retained: OrderedDict[str, _Retained] = OrderedDict()
        self.retained_hits = 0
        self._rows = _Rows(self)
        self._queue: deque[int] = deque()
        self._requests: dict[int, GenRequest] = {}
        self._pending: torch.Tensor | None = None  # sampled ids the running rows have not fed yet

    @property
    def version(self) -> int:
        return self._version

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        try:
            self.model.load_canonical_state_dict(state_dict)
        except ValueError as exc:
            raise ValueError(f"weights v{version} do not fit the engine's model: {exc}") from None
        self._version = version

    # ------------------------------------------------------------------ the engine seam
    def submit(self, rid: int, request: GenRequest) -> None:
        request.check_fits(self.model_cfg.max_seq_len)
        if rid in self._requests:
            raise ValueError(f"request id {rid} is already running")
        self._requests[rid] = request
        self._queue.append(rid)

    def has_unfinished(self) -> bool:
        return bool(self._rows.active or self._queue)

    def free_slots(self) -> int:
        return max(0, self.cfg.max_batch_size - len(self._rows.active) - len(self._queue))

    @torch.inference_mode()
    def step(self) -> list[tuple[int, GenOutput]]:
        """Start queued requests in free rows, decode up to ``chunk_tokens`` tokens per row (less
        if every row finishes first), and return the requests that finished."""
        rows = self._rows
        free = self.cfg.max_batch_size - len(rows.active)
        new = [self._queue.popleft() for _ in range(min(free, len(self._queue)))]
        if new:  # one forward: running rows feed their pending token, new rows prefill
            rows.start([(i, self._requests[i]) for i in new], self._pending)
        elif self._pending is not None and rows.active:
            rows.decode(self._pending)
        if not rows.active:
            return []
        for t in range(self.cfg.chunk_tokens):
            pending = rows.sample_step()
            if t == self.cfg.chunk_tokens - 1 or rows.all_finished():
                break
            rows.decode(pending)
        done = [(i, rows.output(i, reason)) for i, reason in rows.finished()]
        self._pending = rows.compact(pending)
        for i, _ in done:
            del self._requests[i]
        return done

    @torch.inference_mode()
    def abort(self, rids: list[int]) -> list[tuple[int, GenOutput]]:
        """Stop ``rids`` (queued or running); each returns its tokens so far, finish_reason
        "abort". With ``engine.reuse_kv`` a running row's KV is kept for its resumption."""
        wanted = set(rids)
        rows = self._rows
        out = []
        for i in [i for i in self._queue if i in wanted]:
            self._queue.remove(i)
            out.append((i, GenOutput([], [], None, "abort")))
        running = [i for i in rows.active if i in wanted]
        if running:
            if self.cfg.reuse_kv:
                rows.retain(self._requests, only=set(running))
            out += [(i, rows.output(i, "abort")) for i in running]
            self._pending = rows.compact(self._pending)
        for i, _ in out:
            self._requests.pop(i, None)
        return out

    def stats(self) -> dict[str, float]:
        return {"kv_reused": self.retained_hits, "running": len(self._rows.active), "queued": len(self._queue)}


@dataclass
class _Retained:
    """The keys/values of a stopped sample's tokens (all but its last, which was sampled and not
    yet fed), one (heads, n, head_dim) tensor per layer."""

    token_ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


class _Rows:
    """The running batch: per-row decoding state plus one KV cache in lock-step columns.

    Rows are left-padded to a shared column counter (``cache.length``); a row's keys start
    after its own left padding and its positions are its own. Admitting rows re-lays the cache:
    columns no row still uses are dropped on the left, the new rows' inputs are prefilled so
    that they end in the same column as the running rows' next token, and the capacity is
    sized to the inputs plus a little headroom (most samples of a long-tail workload end early, and
    the next admission re-lays the cache anyway); it grows by half when a row reaches its end.
    Rows that finish leave the per-row state at once but the cache lazily: the next admission
    copies only the surviving rows' used columns, so a finish followed by an admission costs one
    copy of the cache, not two."""

    MIN_HEADROOM = 16  # columns beyond the inputs at a re-lay

    def __init__(self, engine: NativeEngine):
        self.e = engine
        self.active: list[int] = []  # request index of each batch row
        self.cache: KVCache | None = None
        self.cache_rows: torch.Tensor | None = None  # cache row of each batch row, None: the same
        self.valid = self.next_pos = self.logits = self.routed = None
        self.temperature = self.top_p = None
        self.stop_sets: dict[int, set[int]] = {}
        self.budget: dict[int, int] = {}
        self.tokens: dict[int, list[int]] = {}
        self.logps: dict[int, list[float]] = {}
        self.experts: dict[int, list[np.ndarray]] = {}
        self.reason: dict[int, str] = {}

    # ------------------------------------------------------------------ per-token work
    def sample_step(self) -> torch.Tensor:
        """Sample one token for every running row and record it; returns the sampled ids."""
        ids, logps = _sample(self.logits, self.temperature, self.top_p, self.e.generator)
        id_list, lp_list = ids.tolist(), logps.tolist()
        routed_np = self.routed.to(torch.int16).cpu().numpy()
        for i, index in enumerate(self.active):
            if self.reason[index]:  # finished earlier in this chunk; leaves at the boundary
                continue
            self.tokens[index].append(id_list[i])
            self.logps[index].append(lp_list[i])
            self.experts[index].append(routed_np[i])
            if id_list[i] in self.stop_sets[index]:
                self.reason[index] = "stop"
            elif len(self.tokens[index]) >= self.budget[index]:
                self.reason[index] = "length"
        return ids

    def decode(self, pending: torch.Tensor) -> None:
        """Feed each row's sampled token; the next distribution lands in ``self.logits``."""
        if self.cache_rows is not None:
            self.cache, self.cache_rows = self.cache.select(self.cache_rows), None
        if self.cache.length >= self.valid.shape[1]:
            self._grow()
        cache = self.cache
        self.valid[:, cache.length] = True
        mask = self.valid[:, None, None, :cache.length + 1]
        logits, _, _, routed = self.e.model(pending[:, None], self.next_pos[:, None], attn_mask=mask, cache=cache)
        self.logits, self.routed = logits[:, -1], routed[:, -1]
        self.next_pos = self.next_pos + 1

    def _grow(self) -> None:
        """Half as many columns again (at least MIN_HEADROOM): a row decodes past the headroom."""
        extra = max(self.MIN_HEADROOM, self.valid.shape[1] // 2)

        def wider(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(*t.shape[:2], extra, t.shape[3])], dim=2)

        c = self.cache
        self.cache = KVCache([wider(k) for k in c.keys], [wider(v) for v in c.values], c.length)
        self.valid = torch.cat([self.valid, self.valid.new_zeros(self.valid.shape[0], extra)], dim=1)

    # ------------------------------------------------------------------ membership
    def all_finished(self) -> bool:
        return all(self.reason[i] for i in self.active)

    def finished(self) -> list[tuple[int, str]]:
        return [(i, self.reason[i]) for i in self.active if self.reason[i]]

    def output(self, index: int, reason: str) -> GenOutput:
        experts = self.experts.pop(index, [])
        out = GenOutput(self.tokens.pop(index, []), self.logps.pop(index, []),
                        np.stack(experts) if experts else None, reason)
        for table in (self.stop_sets, self.budget, self.reason):
            table.pop(index, None)
        return out

    def compact(self, pending: torch.Tensor) -> torch.Tensor:
        """Finished rows (already reported) leave the batch now and the cache at the next decode
        or admission (``cache_rows`` says which cache rows are still in use)."""
        keep = [i for i, index in enumerate(self.active) if index in self.reason]  # output() forgot the rest
        if len(keep) == len(self.active):
            return pending
        rows = torch.tensor(keep, dtype=torch.long, device=self.e.device)
        self.active = [self.active[i] for i in keep]
        self.cache_rows = rows if self.cache_rows is None else self.cache_rows[rows]
        for name in ("valid", "next_pos", "logits", "routed", "temperature", "top_p"):
            setattr(self, name, getattr(self, name)[rows])
        return pending[rows]

    def retain(self, requests: dict[int, GenRequest], only: set[int]) -> None:
        """Keep the KV of the running rows ``only`` that have a ``cache_key`` (being stopped)."""
        e = self.e
        for i, index in enumerate(self.active):
            r = requests[index]
            if index not in only or r.cache_key is None or not self.tokens[index]:
                continue
            # everything but the token sampled last (not fed yet) is in the cache
            fed = r.input_ids + self.tokens[index][:-1]
            lo = self.cache.length - len(fed)
            if lo < 0 or not bool(self.valid[i, lo:self.cache.length].all()) or bool(self.valid[i, :lo].any()):
                continue  # not the layout this row should have: recompute it instead
            row = i if self.cache_rows is None else int(self.cache_rows[i])
            e.retained.pop(r.cache_key, None)
            e.retained[r.cache_key] = _Retained(fed, [k[row, :, lo:self.cache.length].clone() for k in self.cache.keys],
                                                [v[row, :, lo:self.cache.length].clone() for v in self.cache.values])
        while len(e.retained) > 4 * e.cfg.max_batch_size:
            e.retained.popitem(last=False)

    def _take_retained(self, r: GenRequest) -> _Retained | None:
        """The retained KV of ``r`` if it covers exactly all of its input but the last token."""
        e = self.e
        if not e.cfg.reuse_kv or r.cache_key is None or r.cache_key not in e.retained:
            return None
        kept = e.retained.pop(r.cache_key)
        return kept if kept.token_ids == r.input_ids[:-1] else None

    def start(self, new: list[tuple[int, GenRequest]], pending: torch.Tensor | None) -> None:
        """Merge ``new`` requests into the batch in one step: the running rows feed their
        ``pending`` token, resumed rows whose KV was retained feed their last input token over
        it, and the rest are prefilled."""
        e = self.e
        for index, r in new:
            self.stop_sets[index] = set(r.stop_ids) | {e.eos_id}
            self.budget[index] = r.max_new_tokens
            self.tokens[index], self.logps[index], self.experts[index] = [], [], []
            self.reason[index] = ""
        hits, fresh = [], []
        for index, r in new:
            kept = self._take_retained(r)
            if kept is None:
                fresh.append((index, r))
            else:
                hits.append((index, r, kept))
        e.retained_hits += len(hits)
        inputs = [r.input_ids for _, r in fresh]
        running = len(self.active) > 0
        if running:
            # columns left of every running row's first key are dead: drop them
            used = self.valid[:, :self.cache.length].any(dim=0)
            first = int(used.to(torch.int8).argmax()) if bool(used.any()) else self.cache.length
            kept_cols = self.cache.length - first
        else:
            first = kept_cols = 0
        # every row's last input (pending token, retained row's last token, prompt end) lands
        # in column end - 1
        end = max([len(x) for x in inputs] + [len(h[2].token_ids) + 1 for h in hits]
                  + ([kept_cols + 1] if running else []))
        shift = end - 1 - kept_cols
        remaining = [self.budget[i] - len(self.tokens[i]) for i in self.active] + [r.max_new_tokens for _, r in new]
        capacity = end + min(max(remaining), max(self.MIN_HEADROOM, 2 * e.cfg.chunk_tokens))

        # one allocation for the merged batch: running rows, then retained ones, then the prefilled
        n_old, n_hit = len(self.active), len(hits)
        cache = KVCache.allocate(e.model_cfg, n_old + len(new), capacity, e.dtype, e.device)
        valid = torch.zeros((n_old + len(new), capacity), dtype=torch.bool, device=e.device)
        heads = []
        if running or hits:
            feed, pos, temp, top_p = [], [], [], []
            if running:
                for dst, src in zip(cache.keys + cache.values, self.cache.keys + self.cache.values):
                    used_cols = src[:, :, first:first + kept_cols]
                    if self.cache_rows is not None:  # finished rows are still in the old cache
                        used_cols = used_cols.index_select(0, self.cache_rows)
                    dst[:n_old, :, shift:shift + kept_cols] = used_cols
                valid[:n_old, shift:shift + kept_cols] = self.valid[:, first:first + kept_cols]
                feed, pos, temp, top_p = [pending], [self.next_pos], [self.temperature], [self.top_p]
            for j, (_, r, kept) in enumerate(hits):
                n = len(kept.token_ids)
                for dst, src in zip(cache.keys + cache.values, kept.keys + kept.values):
                    dst[n_old + j, :, end - 1 - n:end - 1] = src
                valid[n_old + j, end - 1 - n:end - 1] = True
            if hits:
                def column(values, dtype):
                    return torch.tensor(values, dtype=dtype, device=e.device)
                feed.append(column([r.input_ids[-1] for _, r, _ in hits], torch.long))
                pos.append(column([len(kept.token_ids) for _, _, kept in hits], torch.long))
                temp.append(column([r.temperature for _, r, _ in hits], torch.float32))
                top_p.append(column([r.top_p for _, r, _ in hits], torch.float32))
            rows = n_old + n_hit
            self.cache_rows = None
            self.cache = KVCache([k[:rows] for k in cache.keys], [v[:rows] for v in cache.values], end - 1)
            self.valid = valid[:rows]
            self.next_pos, self.temperature, self.top_p = torch.cat(pos), torch.cat(temp), torch.cat(top_p)
            self.decode(torch.cat(feed))  # writes through the views into the merged cache
            heads.append((self.next_pos, self.logits, self.routed, self.temperature, self.top_p))
        if fresh:
            heads.append(self._prefill(fresh, inputs, end, cache, valid, n_old + n_hit))
        self.cache, self.valid, self.cache_rows = KVCache(cache.keys, cache.values, end), valid, None
        (self.next_pos, self.logits, self.routed, self.temperature,
         self.top_p) = (torch.cat([h[k] for h in heads]) for k in range(5))
        self.active = self.active + [index for index, _, _ in hits] + [index for index, _ in fresh]

    def _prefill(self, new: list[tuple[int, GenRequest]], inputs: list[list[int]], end: int,
                 cache: KVCache, valid: torch.Tensor, row0: int):
        """Prefill the new rows into rows ``row0:`` of ``cache``/``valid`` so their inputs end at
        column ``end - 1``. Rows are prefilled in length buckets (powers of two), each into a
        cache of its own width: a resumed sample's long prefix must not make every short prompt
        beside it pay for padding, nor attend over the running rows' columns. Returns the new
        rows' (next positions, logits, experts, temperatures, top-p)."""
        e = self.e
        order = sorted(range(len(new)), key=lambda k: len(inputs[k]))
        new[:] = [new[k] for k in order]
        inputs[:] = [inputs[k] for k in order]
        outs = []
        lo = 0
        while lo < len(new):
            width = 1 << (len(inputs[lo]) - 1).bit_length()
            hi = lo
            while hi < len(new) and len(inputs[hi]) <= width:
                hi += 1
            width = len(inputs[hi - 1])
            rows = inputs[lo:hi]
            ids = torch.full((len(rows), width), e.pad_id, dtype=torch.long, device=e.device)
            pad = torch.tensor([width - len(x) for x in rows], device=e.device)
            own = torch.zeros((len(rows), width), dtype=torch.bool, device=e.device)
            for row, x in enumerate(rows):
                ids[row, width - len(x):] = torch.tensor(x, device=e.device)
                own[row, width - len(x):] = True
            positions = (torch.arange(width, device=e.device)[None, :] - pad[:, None]).clamp_min(0)
            part = KVCache.allocate(e.model_cfg, len(rows), width, e.dtype, e.device)
            causal = torch.ones(width, width, dtype=torch.bool, device=e.device).tril()
            last = torch.zeros((len(rows), width), dtype=torch.bool, device=e.device)
            last[:, -1] = True  # only the last position's distribution is sampled from
            logits, _, _, routed = e.model(ids, positions, attn_mask=(causal[None] & own[:, None, :])[:, None],
                                           cache=part, logits_at=last)
            for dst, src in zip(cache.keys + cache.values, part.keys + part.values):
                dst[row0 + lo:row0 + hi, :, end - width:end] = src
            valid[row0 + lo:row0 + hi, end - width:end] = own
            outs.append((positions[:, -1] + 1, logits, routed[:, -1]))
            lo = hi
        temperature = torch.tensor([r.temperature for _, r in new], device=e.device, dtype=torch.float32)
        top_p = torch.tensor([r.top_p for _, r in new], device=e.device, dtype=torch.float32)
        return (*(torch.cat([o[k] for o in outs]) for k in range(3)), temperature, top_p)
