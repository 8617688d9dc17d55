"""Attention math, split like flash-linear-attention: parallel and recurrent forms beside a naive reference."""

from less_exp.ops.parallel import attention_logits, parallel_less_attention, sparse_attention
from less_exp.ops.recurrent import fold, recurrent_less_step

__all__ = ["attention_logits", "fold", "parallel_less_attention", "recurrent_less_step", "sparse_attention"]
