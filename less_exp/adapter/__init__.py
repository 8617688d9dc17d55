"""The transformers adapter of the engine: the ``"less"`` attention function, the evicting cache,
the runtime :class:`Compression` and model introspection. Imports torch and transformers only."""

from less_exp.adapter.attention import build, register, switch
from less_exp.adapter.cache import CACHE_ARG, LessCache, cache_kwargs
from less_exp.adapter.compression import Compression, compression_of
from less_exp.adapter.introspection import attention_modules, check_supported

__all__ = [
    "CACHE_ARG",
    "Compression",
    "LessCache",
    "attention_modules",
    "build",
    "cache_kwargs",
    "check_supported",
    "compression_of",
    "register",
    "switch",
]
