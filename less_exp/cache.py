"""A real evicting KV cache for decoding: at most the policy's budget of keys/values per layer, plus H, z.

Slots are unordered: each holds a key, its value, the token's logical position and the policy's
running score. Slot ``N-1`` is the landing slot of the incoming token; after the policy picks a
victim the newcomer moves into the victim's slot (or the first free one) and the victim's key and
value are folded into the LESS state. Memory is therefore constant however long decoding runs.
Keys keep the RoPE positions they were written with, and ``get_seq_length`` reports every token
seen (not only the kept ones), so the model's position ids keep counting past evicted tokens.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from less_exp.compression import Compression, compression_of
from less_exp.ops import attention_logits, fold, recurrent_less_step, sparse_attention
from less_exp.ops.parallel import masked_state_readout


class LessCacheLayer(CacheLayerMixin):
    """One decoder layer's kept keys/values, running scores and LESS state (H, z)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, comp: Compression, layer_idx: int):
        super().__init__()
        self.comp = comp
        self.layer_idx = layer_idx
        self.policy = comp.policy
        self.state = comp.state(layer_idx)
        self.seen = 0
        self.decoding = False
        self.H = self.z = None
        self._chunk = None

    # -- CacheLayerMixin --------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        self.comp.bind(self.layer_idx, self)
        if not self.decoding:
            return key_states, value_states
        if key_states.shape[-2] > 1:
            self._chunk = (key_states, value_states)
            return key_states, value_states
        self._admit(key_states, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    _PER_ROW = ("keys", "values", "present", "logical", "scores", "H", "z", "count")

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
        self.keys = self.values = self.H = self.z = None
        self.seen, self.decoding, self.is_initialized = 0, False, False

    # -- prefill ------------------------------------------------------------------------------
    def start_from_prefill(self, key, value, budget, present, scores, valid, psi) -> None:
        """Keep what the parallel form kept after the last prompt token; fold the rest into the state."""
        self.budget = budget
        B, Hkv, S, _ = key.shape
        logical = (valid.long().cumsum(-1) - 1)[:, None, :].expand(B, Hkv, S)
        self.count = valid.sum(-1)
        if self.state is not None:
            evicted = (valid[:, None, :] & ~present).to(key.dtype)
            self.H = torch.matmul((psi * evicted[..., None]).transpose(-1, -2), value)
            self.z = (psi * evicted[..., None]).sum(-2)
        self._compact(key, value, present, logical, scores)
        self.decoding = True

    def _compact(self, keys, values, present, logical, scores) -> None:
        """Store the present tokens in ``capacity + 1`` slots (the last one is the landing slot)."""
        if self.budget.capacity is None:
            self.keys, self.values, self.present, self.logical, self.scores = keys, values, present, logical, scores
            return
        B, Hkv, S, d = keys.shape
        slots = self.budget.capacity + 1
        kept = min(S, self.budget.capacity)
        order = torch.sort((~present).to(torch.int8), dim=-1, stable=True).indices[..., :kept]
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

    # -- decoding -----------------------------------------------------------------------------
    def _admit(self, key, value) -> None:
        """Add one token, evicting one unprotected token if the budget overflows."""
        if self.budget.capacity is None:
            B, Hkv = key.shape[:2]
            self.keys = torch.cat([self.keys, key], dim=-2)
            self.values = torch.cat([self.values, value], dim=-2)
            self.present = torch.cat([self.present, self.present.new_ones(B, Hkv, 1)], dim=-1)
            self.logical = torch.cat([self.logical, self.count[:, None, None].expand(B, Hkv, 1)], dim=-1)
            self.scores = torch.cat([self.scores, self.scores.new_zeros(B, Hkv, 1)], dim=-1)
            self.count = self.count + 1
            return
        self.keys[..., -1:, :] = key
        self.values[..., -1:, :] = value
        self.present[..., -1] = True
        self.logical[..., -1] = self.count[:, None]
        self.scores[..., -1] = 0.0
        evict, victim = self.policy.select_victims(
            self.present, self.logical, self.scores, self.count[:, None, None], self.budget
        )
        if self.state is not None:
            idx = victim[..., None, None].expand(-1, -1, 1, key.shape[-1])
            self.H, self.z = fold(
                self.state, self.keys.gather(2, idx), self.values.gather(2, idx), evict[..., None], self.H, self.z
            )
        free = (~self.present[..., :-1]).to(torch.int8).argmax(-1)
        target = torch.where(evict, victim, free)[..., None]
        idx = target[..., None].expand(-1, -1, 1, key.shape[-1])
        self.keys.scatter_(2, idx, key)
        self.values.scatter_(2, idx, value)
        for name in ("present", "logical", "scores"):
            buf = getattr(self, name)
            buf.scatter_(2, target, buf[..., -1:].clone())
        self.present[..., -1] = False
        self.count = self.count + 1

    def attend(self, query, scaling):
        if query.shape[-2] > 1:
            return self._attend_chunk(query, *self._chunk, scaling)
        out, probs = recurrent_less_step(
            query, self.keys, self.values, self.present, scaling, self.state, self.H, self.z
        )
        if self.policy.uses_scores:
            new = self.policy.accumulate(self.scores, probs.sum(2)[..., -1, :].to(self.scores.dtype))
            self.scores = torch.where(self.present, new, self.scores)
        return out

    def _attend_chunk(self, query, key, value, scaling):
        """Several new tokens at once (chunked prefill, a new turn): the step rule over slots + chunk.

        Queries see the slots and the chunk through keep-masks built token by token, and the state as
        it was before the chunk plus every token evicted up to that query (a masked linear attention),
        exactly as if the chunk had been decoded one token at a time.
        """
        self._chunk = None
        B, Hkv, c, d = key.shape
        N = self.keys.shape[-2]
        keys = torch.cat([self.keys, key], dim=-2)
        values = torch.cat([self.values, value], dim=-2)
        present = torch.cat([self.present, self.present.new_zeros(B, Hkv, c)], dim=-1)
        steps = torch.arange(c, device=key.device)
        logical = torch.cat([self.logical, (self.count[:, None] + steps)[:, None, :].expand(B, Hkv, c)], dim=-1)
        scores = torch.cat([self.scores, self.scores.new_zeros(B, Hkv, c)], dim=-1)
        logits = attention_logits(query, keys, scaling)
        keep = present.new_zeros(B, Hkv, c, N + c)
        left_at = torch.full((B, Hkv, N + c), c, dtype=torch.long, device=key.device)
        budget = self.budget
        if budget.capacity is not None:
            current = self.count[:, None, None, None] + steps[:, None]
            ahead = logical[:, :, None, :]
            eligible = (ahead >= budget.sink) & (ahead <= current - budget.recent)
            over = self.present.sum(-1)[..., None] + steps + 1 > budget.capacity
            always = over.all(0).all(0).tolist()
        if self.policy.uses_scores:
            seen = torch.cat([self.present[:, :, None, :].expand(B, Hkv, c, N),
                              torch.ones(c, c, dtype=torch.bool, device=key.device).tril().expand(B, Hkv, c, c)], -1)
            masked = logits.masked_fill(~seen[:, :, None], -torch.inf)
            weights = (masked - masked.amax(-1, keepdim=True)).exp()
        for j in range(c):
            present[..., N + j] = True
            if budget.capacity is not None:
                victim = scores.masked_fill(~(present & eligible[:, :, j]), torch.inf).argmin(-1, keepdim=True)
                if always[j]:
                    present.scatter_(-1, victim, False)
                    left_at.scatter_(-1, victim, j)
                else:
                    evict = over[..., j, None]
                    present.scatter_(-1, victim, present.gather(-1, victim) & ~evict)
                    left_at.scatter_(-1, victim, torch.where(evict, j, left_at.gather(-1, victim)))
            keep[:, :, j] = present
            if self.policy.uses_scores:
                w = weights[..., j, :] * present[:, :, None]
                scores = self.policy.accumulate(scores, (w / w.sum(-1, keepdim=True)).sum(2))
        out, lse, _ = sparse_attention(logits, keep, values)
        if self.state is not None:
            phi = self.state.phi(query).reshape(B, Hkv, -1, c, self.H.shape[-2])
            psi = self.state.psi(keys)
            gone = left_at[:, :, None, :] <= steps[None, None, :, None]
            num, den = masked_state_readout(phi, psi, values, gone)
            num = num + torch.matmul(phi, self.H[:, :, None])
            den = den + torch.matmul(phi, self.z[:, :, None, :, None])[..., 0]
            out = self.state.normalizer(out, lse, num, den)
            psi = psi * (left_at < c)[..., None]
            self.H = self.H + torch.matmul(psi.transpose(-1, -2), values)
            self.z = self.z + psi.sum(-2)
        self._compact(keys, values, present, logical, scores)
        self.count = self.count + c
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
            "state": size(self.H, self.z),
            "bookkeeping": size(self.present, self.logical, self.scores),
        }


class LessCache(Cache):
    """A ``transformers`` Cache whose layers really evict; pass it as ``past_key_values``."""

    def __init__(self, model):
        comp = compression_of(model)
        if comp is None:
            raise ValueError("LessCache needs a model prepared with less_exp.compression.apply/build")
        super().__init__(layers=[LessCacheLayer(comp, i) for i in range(comp.num_layers)])

    def nbytes(self) -> dict:
        total: dict = {}
        for layer in self.layers:
            for k, v in layer.nbytes().items():
                total[k] = total.get(k, 0) + v
        return total
