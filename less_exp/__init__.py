"""less-exp: Hydra-configured experiments on KV-cache compression (LESS and successors)."""

from less_exp.paths import register_resolvers

__version__ = "0.1.0"

register_resolvers()
