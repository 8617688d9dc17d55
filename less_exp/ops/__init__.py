"""Attention math as tensors in, tensors out (flash-linear-attention's split): the sparse part, the
state part as a causal linear attention over the evicted stream (parallel, chunked, recurrent), the
joint normaliser, and float64 references in ``naive``. Nothing here knows about modules or models."""

from less_exp.ops.gates import stream_log_weights
from less_exp.ops.headwise import headwise_matmul
from less_exp.ops.linear_attention import (
    chunk_linear_attention,
    fold_stream,
    gather_stream,
    linear_attention,
    parallel_linear_attention,
    recurrent_linear_attention,
    stream_positions,
)
from less_exp.ops.normalize import joint_normalize, norm_mix
from less_exp.ops.sparse import attention_logits, blocked_sparse_attention, causal_attention, sparse_attention

__all__ = [
    "attention_logits",
    "blocked_sparse_attention",
    "causal_attention",
    "chunk_linear_attention",
    "fold_stream",
    "gather_stream",
    "headwise_matmul",
    "joint_normalize",
    "norm_mix",
    "linear_attention",
    "parallel_linear_attention",
    "recurrent_linear_attention",
    "sparse_attention",
    "stream_log_weights",
    "stream_positions",
]
