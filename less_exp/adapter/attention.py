"""The ``"less"`` attention function, registered with transformers' ``AttentionInterface``, and
:func:`build`, which attaches a policy and LESS states to any decoder that dispatches through it.

transformers calls it as ``fn(module, query, key, value, attention_mask, scaling=..., **kwargs)`` with
post-RoPE queries ``[B, H, q, d]`` and keys/values ``[B, Hkv, k, d]`` after the cache update. Without a
:class:`~less_exp.adapter.cache.LessCache` (or during its prefill) it runs the parallel form over the
whole sequence (or, with ``policy.prefill=one_shot`` and a cache, full attention and one cut to the
budget); once the cache is decoding it hands the new tokens to the cache, which admits them,
evicts and attends. Everything inside runs in float32; the output returns in the model's dtype.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from less_exp.adapter.compression import Compression, attach, compression_for_module
from less_exp.adapter.introspection import attention_modules, check_supported, dimensions
from less_exp.policies import EvictionPolicy
from less_exp.state import LessStates

NAME = "less"


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """Mask builder for ``"less"``: only which keys are real (``[B, kv]`` bool), or None without padding.

    The policy builds the causal keep-masks itself, so only the padding information is needed.
    """
    if attention_mask is None:
        return None
    mask = attention_mask[:, kv_offset : kv_offset + kv_length].bool()
    return None if bool(mask.all()) else mask


def _valid_keys(attention_mask: torch.Tensor | None, kv_length: int) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        attention_mask = attention_mask[:, 0, -1, :] if attention_mask.dtype == torch.bool else attention_mask[:, 0, -1, :] == 0
    return attention_mask[:, -kv_length:].bool()


def less_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    comp = compression_for_module(module)
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    cache_layer = comp.take_bound(module.layer_idx)
    valid = _valid_keys(attention_mask, key.shape[-2])
    if cache_layer is not None and cache_layer.decoding:
        out = cache_layer.attend(query, valid, scaling)
    else:
        if query.shape[-2] != key.shape[-2]:
            raise RuntimeError(
                "decoding with the 'less' attention needs a LessCache: pass cache=LessCache(model) "
                "(a DynamicCache keeps every token, which is not what the policy describes)"
            )
        one_shot = cache_layer is not None and comp.policy.prefill == "one_shot"
        form = comp.one_shot if one_shot else comp.parallel
        out, prefill = form(module.layer_idx, query, key, value, valid, scaling)
        if cache_layer is not None:
            cache_layer.start_from_prefill(key, value, prefill)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register() -> None:
    """Idempotently register the attention function and its mask builder under ``"less"``."""
    AttentionInterface.register(NAME, less_attention)
    AttentionMaskInterface.register(NAME, padding_mask)


def build(
    model: torch.nn.Module, policy: EvictionPolicy, states: LessStates | None, baseline_plus_tokens: float = 0.0
) -> Compression:
    """Attach ``policy`` and ``states`` to ``model`` and switch it to the ``less`` attention.

    The states move to the model's device and stay in float32 whatever the model's dtype.
    """
    check_supported(model)
    dims = dimensions(model)
    comp = Compression(policy=policy, states=states, state_tokens=baseline_plus_tokens, **dims)
    if states is not None:
        if len(states) != dims["num_layers"]:
            raise ValueError(f"LESS state has {len(states)} layers but the model has {dims['num_layers']}")
        param = next(model.parameters())
        states.to(device=param.device, dtype=torch.float32).train(model.training)
    register()
    switch(model, comp)
    return comp


def switch(model: torch.nn.Module, comp: Compression | None) -> None:
    """Make ``model`` run ``comp`` (built by :func:`build` for this model), or its plain sdpa attention."""
    attach(model, attention_modules(model), comp)
    model.set_attn_implementation("sdpa" if comp is None else NAME)
