"""Where gates meet eviction: the weight an evicted token enters the state with.

A token written at ``s`` and evicted at step ``e`` enters the state with ``exp(G_e - G_s)`` (``G`` the
running sum of log-gates) and then decays with the state. Every form runs over a *pool* of candidate
tokens: the slots a cache held before the chunk, then the chunk's ``c`` incoming tokens. A slot carries
its *age* ``G_now - G_s`` (<= 0: the log-weight it would enter the state with if evicted now), so no
absolute running sum is ever kept and its float32 rounding cannot grow with the length of a conversation.
"""

from __future__ import annotations

import torch


def stream_log_weights(
    g: torch.Tensor, evicted: torch.Tensor, prior: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-weights of the stream entries, and the pool's ages after the chunk.

    Args:
        g: ``[B, Hkv, c, F]`` log-gates of the incoming tokens (0 at padding), F = 1 or D'.
        evicted: ``[B, Hkv, c]`` index into the pool ``[prior slots (n0), incoming (c)]`` of the token
            evicted at each step, -1 for none.
        prior: ``[B, Hkv, n0, F]`` ages of the slots at the step before the chunk (<= 0), or None for no slots.
    Returns:
        ``(log_weight [B, Hkv, c, F]`` (<= 0; 0 where nothing was evicted), ``ages [B, Hkv, n0 + c, F])``:
        the ages of the whole pool at the chunk's last step.
    """
    g = g.float()
    running = g.cumsum(2)  # G_t - G_before, <= 0 and falling
    written = running if prior is None else torch.cat([-prior.float(), running], dim=2)  # G_s - G_before
    idx = evicted.clamp_min(0)[..., None].expand(*evicted.shape, g.shape[-1])
    weight = (running - written.gather(2, idx)).clamp_max(0.0) * (evicted >= 0)[..., None]
    return weight, (running[:, :, -1:] - written).clamp_max(0.0)
