"""less-exp: Hydra-configured experiments on KV-cache compression (LESS and successors).

Two layers that import one way. The engine, torch and transformers only: ``policies`` (eviction),
``state`` (feature maps, normalisers, the per-layer LESS state), ``ops`` (the math as tensors in,
tensors out) and ``adapter`` (the attention function, the evicting cache, the runtime object, model
introspection). The platform on top: ``factory`` (config to engine objects), ``checkpoints``,
``models``, ``data``, ``tasks``, ``training``, ``report``, ``tracking`` and the ``eval``/``train`` jobs.

``less_exp.compress(model, policy="h2o", checkpoint=...)`` (:mod:`less_exp.api`) is the Python API; it is
imported on first use, so ``import less_exp`` stays light for the command lines.
"""

__version__ = "0.1.0"
__all__ = ["Compressed", "compress"]


def __getattr__(name: str):
    if name in __all__:
        from less_exp import api

        return getattr(api, name)
    raise AttributeError(f"module 'less_exp' has no attribute {name!r}")
