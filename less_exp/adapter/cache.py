"""A real evicting KV cache for decoding: at most the policy's budget of keys/values per layer, plus the state.

Slots are unordered: each holds a key, its value, the token's logical position and the policy's
running score. Slot ``N-1`` is the landing slot of the incoming token; after the policy picks a
victim the newcomer moves into the victim's slot (or the first free one) and the victim enters the
LESS state. Memory is therefore constant however long decoding runs. Keys keep the RoPE positions
they were written with, and ``get_seq_length`` reports every token seen (not only the kept ones), so
the model's position ids keep counting past evicted tokens.

``update`` only hands the new keys/values over; the attention call right after it (which sees the
attention mask) admits them, so padding that arrives while decoding is never taken for a token.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation import utils as generation_utils

from less_exp.adapter.compression import Compression, Prefill, compression_of
from less_exp.ops import attention_logits, gather_stream, sparse_attention, stream_positions

# transformers 5.24 renamed the cache argument of ``forward``/``generate`` from ``past_key_values`` to ``cache``
CACHE_ARG = "cache" if "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def cache_kwargs(cache) -> dict:
    """``{<the cache argument of this transformers>: cache}`` for ``model(...)`` and ``model.generate(...)``."""
    return {} if cache is None else {CACHE_ARG: cache}


class LessCacheLayer(CacheLayerMixin):
    """One decoder layer's kept keys/values, running scores and LESS state ``[H | z]``."""

    is_sliding = False
    is_compileable = False

    def __init__(self, comp: Compression, layer_idx: int):
        super().__init__()
        self.comp = comp
        self.layer_idx = layer_idx
        self.policy = comp.policy
        self.less = comp.state(layer_idx)
        self.seen = 0
        self.decoding = False
        self.state = None
        self.ages = None  # a gated state's per-slot ages G_now - G_s (<= 0, ops.gates)
        self._pending = None

    # -- CacheLayerMixin --------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states, *args, **kwargs) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        self.comp.bind(self.layer_idx, self)
        if self.decoding:
            self._pending = (key_states, value_states)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    _PER_ROW = ("keys", "values", "present", "logical", "scores", "ages", "state", "count")

    def _map_rows(self, fn) -> None:
        for name in self._PER_ROW:
            tensor = getattr(self, name, None)
            if tensor is not None:
                setattr(self, name, fn(tensor))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: every per-row tensor follows the beams, the state and scores included."""
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda t: t[indices])

    def reset(self) -> None:
        self.keys = self.values = self.state = self.ages = self._pending = None
        self.seen, self.decoding, self.is_initialized = 0, False, False

    # -- prefill ------------------------------------------------------------------------------
    def start_from_prefill(self, key, value, prefill: Prefill) -> None:
        """Keep what the parallel form kept after the last prompt token; its final state comes along."""
        self.budget = prefill.budget
        sched = prefill.schedule
        self.count = sched.count
        self.state = prefill.state
        self._compact(key, value, sched.present, sched.logical, sched.scores, prefill.ages)
        self.decoding = True

    def _compact(self, keys, values, present, logical, scores, ages=None) -> None:
        """Store the present tokens in logical order in ``capacity + 1`` slots (the last one is the
        landing slot), as :meth:`EvictionPolicy.schedule` expects them."""
        if self.budget.capacity is None:
            self.keys, self.values, self.present, self.logical, self.scores = keys, values, present, logical, scores
            self.ages = ages
            return
        B, Hkv, S, d = keys.shape
        slots = self.budget.capacity + 1
        kept = min(S, self.budget.capacity)
        order = logical.masked_fill(~present, torch.iinfo(logical.dtype).max).argsort(dim=-1, stable=True)[..., :kept]
        gather = order[..., None].expand(-1, -1, -1, d)
        self.keys = keys.new_zeros(B, Hkv, slots, d)
        self.values = values.new_zeros(B, Hkv, slots, d)
        self.present = present.new_zeros(B, Hkv, slots)
        self.logical = logical.new_full((B, Hkv, slots), -1)
        self.scores = scores.new_zeros(B, Hkv, slots)
        self.keys[..., :kept, :] = keys.gather(2, gather)
        self.values[..., :kept, :] = values.gather(2, gather)
        self.present[..., :kept] = present.gather(2, order)
        self.logical[..., :kept] = logical.gather(2, order)
        self.scores[..., :kept] = scores.gather(2, order)
        self.ages = None
        if ages is not None:
            self.ages = ages.new_zeros(B, Hkv, slots, ages.shape[-1])
            self.ages[..., :kept, :] = ages.gather(2, order[..., None].expand(-1, -1, -1, ages.shape[-1]))

    # -- decoding -----------------------------------------------------------------------------
    def attend(self, query: torch.Tensor, valid: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Admit the pending tokens (``valid [B, c]``: False at padding), evict, attend: ``[B, H, c, d]`` float32."""
        key, value = self._pending
        self._pending = None
        B, c = query.shape[0], query.shape[-2]
        arrive = torch.ones(B, c, dtype=torch.bool, device=query.device) if valid is None else valid.to(query.device)
        if c > 1 or self.budget.capacity is None:
            return self._attend_chunk(query, key, value, arrive, scaling)
        return self._attend_one(query, key, value, arrive[:, 0], scaling)

    def _attend_one(self, query, key, value, arrive, scaling):
        """One token: land it in the spare slot, run the step rule once, attend, move it into place."""
        B, Hkv = key.shape[:2]
        here = arrive[:, None]
        self.keys[..., -1:, :] = key
        self.values[..., -1:, :] = value
        self.present[..., -1] = here
        self.logical[..., -1] = torch.where(here, self.count[:, None], -1)
        self.scores[..., -1] = 0.0
        evict, victim = self.policy.victim(self.present, self.logical, self.scores, self.count[:, None, None], self.budget)
        self.present.scatter_(-1, victim[..., None], self.present.gather(-1, victim[..., None]) & ~evict[..., None])
        sees = self.present.clone()
        sees[..., -1] = True  # a padding query sees only itself, as in the parallel form
        sees[..., :-1] &= here[..., None]
        logits = attention_logits(query, self.keys, scaling)
        out, lse, probs = sparse_attention(logits, sees[:, :, None], self.values)
        if self.less is not None:
            ev = torch.where(evict, victim, -1)[..., None]
            q_pos, s_pos = stream_positions(self.logical, ev, 1)
            gates = self.less.gates(value, arrive[:, None], ev, None if self.ages is None else self.ages[..., :-1, :])
            out, self.state = self.less.attend(query, gather_stream(self.keys, ev), gather_stream(self.values, ev),
                                               ev >= 0, out, lse, initial=self.state, query_pos=q_pos, stream_pos=s_pos,
                                               gates=gates)
            if gates is not None:
                self.ages = gates.ages
        if self.policy.uses_scores:
            new = self.policy.accumulate(self.scores, probs.sum(2)[:, :, 0])
            self.scores = torch.where(here[..., None], new, self.scores)
        free = (~self.present[..., :-1]).to(torch.int8).argmax(-1)
        target = torch.where(evict, victim, free)[..., None]
        target = torch.where(here[..., None], target, self.present.shape[-1] - 1)
        idx = target[..., None].expand(-1, -1, 1, key.shape[-1])
        self.keys.scatter_(2, idx, key)
        self.values.scatter_(2, idx, value)
        for name in ("present", "logical", "scores"):
            buf = getattr(self, name)
            buf.scatter_(2, target, buf[..., -1:].clone())
        if self.ages is not None:
            width = self.ages.shape[-1]
            self.ages.scatter_(2, target[..., None].expand(-1, -1, -1, width), self.ages[..., -1:, :].clone())
        self.present[..., -1] = False
        self.count = self.count + arrive.long()
        return out.reshape(B, -1, 1, key.shape[-1])

    def _attend_chunk(self, query, key, value, arrive, scaling):
        """Several new tokens at once (chunked prefill, a new turn), or any step of the full cache: the
        step rule token by token over slots + chunk, exactly as if they had come one at a time."""
        B, Hkv, c, d = key.shape
        if self.budget.capacity is not None:  # decoding leaves the slots unordered
            self._compact(self.keys, self.values, self.present, self.logical, self.scores, self.ages)
        keys = torch.cat([self.keys, key], dim=-2)
        values = torch.cat([self.values, value], dim=-2)
        logits = attention_logits(query, keys, scaling)
        slots = (self.present, self.logical, self.scores, self.count)
        sched = self.policy.schedule(self.budget, arrive, Hkv, logits if self.policy.uses_scores else None, slots)
        out, lse, _ = sparse_attention(logits, sched.keep, values)
        ages = None
        if self.less is not None:
            ev = sched.evicted
            q_pos, s_pos = stream_positions(sched.logical, ev, c)
            gates = self.less.gates(value, arrive, ev, self.ages)
            out, self.state = self.less.attend(query, gather_stream(keys, ev), gather_stream(values, ev), ev >= 0,
                                               out, lse, initial=self.state, chunk_size=self.comp.chunk_size,
                                               query_pos=q_pos, stream_pos=s_pos, gates=gates)
            ages = None if gates is None else gates.ages
        self._compact(keys, values, sched.present, sched.logical, sched.scores, ages)
        self.count = sched.count
        return out.reshape(B, -1, c, d)

    # -- accounting ---------------------------------------------------------------------------
    def nbytes(self) -> dict:
        """Bytes held: keys/values (the cache proper), the LESS state, and the policy's bookkeeping."""
        def size(*ts):
            return sum(t.numel() * t.element_size() for t in ts if t is not None)

        if not self.decoding:
            return {"kv": 0, "state": 0, "bookkeeping": 0}
        return {
            "kv": size(self.keys, self.values),
            "state": size(self.state),
            "bookkeeping": size(self.present, self.logical, self.scores, self.ages),
        }


class LessCache(Cache):
    """A ``transformers`` Cache whose layers really evict; pass it with :func:`cache_kwargs`."""

    def __init__(self, model):
        comp = compression_of(model)
        if comp is None:
            raise ValueError("LessCache needs a model prepared with less_exp.adapter.build (or factory.apply)")
        super().__init__(layers=[LessCacheLayer(comp, i) for i in range(comp.num_layers)])

    def nbytes(self) -> dict:
        total: dict = {}
        for layer in self.layers:
            for k, v in layer.nbytes().items():
                total[k] = total.get(k, 0) + v
        return total
