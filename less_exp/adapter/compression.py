"""The runtime object that a compressed model carries: its policy, its LESS states, the parallel form.

A :class:`Compression` is kept beside the model (looked up by module or by model), never inside it:
the model object is not modified beyond ``set_attn_implementation``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from less_exp.ops import attention_logits, blocked_sparse_attention, causal_attention, gather_stream, stream_positions
from less_exp.policies import Budget, EvictionPolicy, Schedule
from less_exp.state import LessStates

_BY_MODULE: "weakref.WeakKeyDictionary[torch.nn.Module, Compression]" = weakref.WeakKeyDictionary()
_BY_MODEL: "weakref.WeakKeyDictionary[torch.nn.Module, Compression]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Prefill:
    """What a cache needs to continue from a parallel prefill: the budget, the schedule, the final state
    and, for a gated state, every token's age (its running log-gate relative to the last step)."""

    budget: Budget
    schedule: Schedule
    state: torch.Tensor | None
    ages: torch.Tensor | None = None


@dataclass
class Compression:
    """A model's policy and LESS state, shared by the parallel form and the decoding cache."""

    policy: EvictionPolicy
    states: LessStates | None
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    state_tokens: float = 0.0
    chunk_size: int = 64
    attention_block: int = 256  # queries per block of the parallel form
    plain_layers: frozenset = frozenset()  # layers that run the policy alone, their state set aside
    _bound: dict = field(default_factory=dict, repr=False)
    _memo: tuple | None = field(default=None, repr=False)

    def budget(self, length: int) -> Budget:
        return self.policy.budget(length=length, max_positions=self.max_positions, state_tokens=self.state_tokens)

    def state(self, layer_idx: int):
        if self.states is None or layer_idx in self.plain_layers:
            return None
        return self.states[layer_idx]

    def bind(self, layer_idx: int, cache_layer) -> None:
        """Called by a cache layer's ``update`` so the attention call right after it finds the cache."""
        self._bound[layer_idx] = cache_layer

    def take_bound(self, layer_idx: int):
        return self._bound.pop(layer_idx, None)

    def schedule(self, budget: Budget, valid: torch.Tensor, logits) -> Schedule:
        """The policy's parallel face. A ranking that ignores attention gives every layer the same
        schedule, so it is computed once per sequence and reused by the following layers."""
        if self.policy.uses_scores:
            return self.policy.keep_mask(budget, valid, self.num_kv_heads, logits)
        key = (budget, tuple(valid.shape), valid.device, valid.cpu().numpy().tobytes())
        if self._memo is None or self._memo[0] != key:
            self._memo = (key, self.policy.keep_mask(budget, valid, self.num_kv_heads))
        return self._memo[1]

    def parallel(self, layer_idx, query, key, value, valid, scaling) -> tuple[torch.Tensor, Prefill]:
        """Parallel form for one layer: ``[B, H, S, d]`` float32, and what a cache needs to continue."""
        B, H, S, d = query.shape
        valid = valid if valid is not None else torch.ones(B, S, dtype=torch.bool, device=key.device)
        budget = self.budget(int(valid.sum(-1).max()))

        def rows(start, stop):  # a ranking reads every query's attention, a block of queries at a time, over
            return attention_logits(query[..., start:stop, :].detach(), key[..., :stop, :].detach(), scaling)  # keys they may see

        sched = self.schedule(budget, valid, rows if self.policy.uses_scores else None)
        out, lse = blocked_sparse_attention(query, key, value, sched.keep, scaling, self.attention_block)
        state, final, gates = self.state(layer_idx), None, None
        if state is not None:
            ev = sched.evicted
            q_pos, s_pos = stream_positions(sched.logical, ev, S)
            gates = state.gates(value, valid, ev)
            out, final = state.attend(query, gather_stream(key, ev), gather_stream(value, ev), ev >= 0, out, lse,
                                      chunk_size=self.chunk_size, query_pos=q_pos, stream_pos=s_pos, gates=gates)
        return out.reshape(B, H, S, d), Prefill(budget, sched, final, None if gates is None else gates.ages)

    def one_shot(self, layer_idx, query, key, value, valid, scaling) -> tuple[torch.Tensor, Prefill]:
        """A one-shot prefill (``policy.prefill=one_shot``) for one layer: the prompt attends fully, then
        :meth:`EvictionPolicy.compress` cuts it to the budget by the policy's scores over the prompt and
        the state folds in what was evicted. Returns ``[B, H, S, d]`` float32 and what a cache needs."""
        B, H, S, d = query.shape
        valid = valid if valid is not None else torch.ones(B, S, dtype=torch.bool, device=key.device)
        budget = self.budget(int(valid.sum(-1).max()))
        scored = self.policy.uses_scores and budget.capacity is not None
        out, received, last = causal_attention(query, key, value, valid, scaling, self.attention_block, scores=scored)
        scores = self.policy.prompt_scores(received, last) if scored else None
        sched = self.policy.compress(budget, valid, self.num_kv_heads, scores)
        state, final, gates = self.state(layer_idx), None, None
        if state is not None:
            ev = sched.evicted
            gates = state.gates(value, valid, ev)
            final = state.fold(gather_stream(key, ev), gather_stream(value, ev), ev >= 0,
                               stream_positions(sched.logical, ev, S)[1], gates)
        return out, Prefill(budget, sched, final, None if gates is None else gates.ages)

    def describe(self, length: int) -> dict:
        budget = self.budget(length)
        return {
            "policy": self.policy.name,
            "prefill": self.policy.prefill,
            "budget": budget.capacity,
            "sink": budget.sink,
            "heavy": budget.heavy,
            "recent": budget.recent,
            "state_token_equivalents": self.states.token_equivalents() if self.states is not None else 0.0,
            "state_features": self.states[0].num_features if self.states is not None else 0,
        }


def attach(model: torch.nn.Module, modules: list[torch.nn.Module], comp: Compression | None) -> None:
    """Record that ``model`` (and its attention ``modules``) run ``comp``; None detaches it."""
    if comp is None:
        _BY_MODEL.pop(model, None)
        return
    for m in modules:
        _BY_MODULE[m] = comp
    _BY_MODEL[model] = comp


def compression_of(model: torch.nn.Module) -> Compression | None:
    return _BY_MODEL.get(model)


def compression_for_module(module: torch.nn.Module) -> Compression:
    try:
        return _BY_MODULE[module]
    except KeyError:
        raise RuntimeError(
            "the 'less' attention was called on a model that has no compression attached; use less_exp.adapter.build"
        ) from None
