"""The ``"less"`` attention function, registered with transformers' ``AttentionInterface``.

transformers calls it as ``fn(module, query, key, value, attention_mask, scaling=..., **kwargs)`` with
post-RoPE queries ``[B, H, q, d]`` and keys/values ``[B, Hkv, k, d]`` after the cache update. Without a
:class:`~less_exp.cache.LessCache` (or during its prefill) it runs the parallel form over the whole
sequence; once the cache is decoding it runs one recurrent step over the kept slots and the state.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from less_exp.compression import compression_for_module

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
    if cache_layer is not None and cache_layer.decoding:
        out = cache_layer.attend(query, scaling)
    else:
        if query.shape[-2] != key.shape[-2]:
            raise RuntimeError(
                "decoding with the 'less' attention needs a LessCache: pass past_key_values=LessCache(model) "
                "(a DynamicCache keeps every token, which is not what the policy describes)"
            )
        valid = _valid_keys(attention_mask, key.shape[-2])
        out, carry = comp.parallel(module.layer_idx, query, key, value, valid, scaling)
        if cache_layer is not None:
            cache_layer.start_from_prefill(key, value, **carry)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Idempotently register the attention function and its mask builder under ``"less"``."""
    AttentionInterface.register(NAME, less_attention)
    AttentionMaskInterface.register(NAME, padding_mask)
