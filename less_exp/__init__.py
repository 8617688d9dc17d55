"""less-exp: Hydra-configured experiments on KV-cache compression (LESS and successors).

Two layers that import one way. The engine, torch and transformers only: ``policies`` (eviction),
``state`` (feature maps, normalisers, the per-layer LESS state), ``ops`` (the math as tensors in,
tensors out) and ``adapter`` (the attention function, the evicting cache, the runtime object, model
introspection). The platform on top: ``factory`` (config to engine objects), ``checkpoints``,
``models``, ``data``, ``tasks``, ``training``, ``report``, ``tracking`` and the ``eval``/``train`` jobs.
"""

__version__ = "0.1.0"
