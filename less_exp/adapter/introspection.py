"""What the engine needs to know about a transformers decoder: its attention modules and shapes."""

from __future__ import annotations

import torch

UNSUPPORTED_CONFIG = {
    "attn_logit_softcapping": "attention logit soft-capping",
    "query_pre_attn_scalar": "a custom query scaling",
}


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of a decoder, in layer order."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    return sorted(found, key=lambda m: m.layer_idx)


def check_supported(model: torch.nn.Module) -> None:
    """Fail before any heavy work on a model whose attention the LESS function cannot reproduce."""
    config = model.config
    for key, what in UNSUPPORTED_CONFIG.items():
        if getattr(config, key, None) is not None:
            raise ValueError(f"{config.model_type} uses {what} ({key}); less-exp's attention does not support it yet")
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        raise ValueError(
            f"{config.model_type} has a native sliding window ({config.sliding_window}); set it to null in the model "
            "config or use policy=window to get the same effect"
        )
    if not attention_modules(model):
        raise ValueError(f"{type(model).__name__} has no attention modules with layer_idx/num_key_value_groups")


def dimensions(model: torch.nn.Module) -> dict:
    """``num_layers, num_heads, num_kv_heads, head_dim, max_positions`` of a decoder."""
    modules = attention_modules(model)
    config = model.config
    return {
        "num_layers": len(modules),
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "head_dim": modules[0].head_dim,
        "max_positions": config.max_position_embeddings,
    }
