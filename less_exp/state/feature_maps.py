"""Feature maps phi (queries, per query head) and psi (keys, per KV head) of the LESS state.

Every map returns non-negative features so that ``phi(q) . psi(k)`` is a valid attention weight and
reports its feature count ``num_features`` (D'), which sets the state's memory. Every map multiplies
its key features by a learned positive scale per KV head (stored as its log) that starts tiny
(``key_scale_init``), so an untrained state adds almost nothing and LESS starts as the plain policy.
Fixed random draws (Performer, DiJiang) are persistent buffers drawn from ``seed``: they are saved
in checkpoints and never redrawn (another draw is another ``seed``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from less_exp.ops.headwise import headwise_matmul


def _require(kind, **values) -> None:
    """Each value must be of ``kind`` (bools excluded): a config typo fails with its name, not a TypeError."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"{name}={value!r} must be {'an integer' if kind is int else 'a number'}")


def _generator(seed) -> torch.Generator:
    _require(seed=seed, kind=int)
    return torch.Generator().manual_seed(seed)


def _by_kv_head(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[Hkv, ...] -> [H, ...]``: each query head starts from its KV head's weights (GQA order)."""
    return weight.repeat_interleave(num_heads // weight.shape[0], dim=0).clone()


class FeatureMap(nn.Module):
    """Base: ``query(q [B, H, S, d]) -> [B, H, S, D']`` and ``key(k [B, Hkv, S, d]) -> [B, Hkv, S, D']``.

    Subclasses implement ``_query``/``_key`` (the raw features); the base applies the key scale.
    """

    num_features: int

    def __init__(self, num_kv_heads: int, key_scale_init: float):
        super().__init__()
        _require(key_scale_init=key_scale_init, kind=(int, float))
        if key_scale_init <= 0:
            raise ValueError(f"key_scale_init={key_scale_init} must be > 0")
        self.log_key_scale = nn.Parameter(torch.full((num_kv_heads, 1, 1), math.log(key_scale_init)))

    def query(self, q: torch.Tensor) -> torch.Tensor:
        return self._query(q)

    def key(self, k: torch.Tensor) -> torch.Tensor:
        return self._key(k) * self.log_key_scale.exp().to(k.dtype)

    def query_with_offset(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(features, log_offset [B, H, S] or None)``: the true features are ``features * exp(log_offset)``.

        Maps with exponential features return them scaled down (so sums of them cannot overflow) and
        the scale as a log; the normaliser adds it back in log space. The default has no offset.
        """
        return self.query(q), None

    def _query(self, q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _key(self, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def settings(self) -> dict:
        """What a checkpoint must match to load this map's parameters."""
        return {"name": type(self).__name__, "num_features": self.num_features}


class HeadwiseMLP(nn.Module):
    """Two bias-free layers ``d -> hidden -> out`` with GELU, one weight set per head (or shared)."""

    def __init__(self, heads: int, dim: int, hidden: int, out: int, dropout: float, per_head: bool):
        super().__init__()
        n = heads if per_head else 1
        self.w1 = nn.Parameter(torch.empty(n, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(n, hidden, out))
        for w in (self.w1, self.w2):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, heads, S, d] -> [B, heads, S, out]``."""
        hidden = nn.functional.gelu(headwise_matmul(x, self.w1))
        if self.training and self.dropout > 0:
            hidden = nn.functional.dropout(hidden, self.dropout)
        return headwise_matmul(hidden, self.w2)


class LessMLP(FeatureMap):
    """The LESS paper's kernels: ``phi(q) = |MLP_q(q)|``, ``psi(k) = s * |MLP_k(k)|``.

    Dropout on the hidden layer acts only in training.
    """

    def __init__(
        self,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        hidden: int = 512,
        features: int = 8,
        key_scale_init: float = 1e-4,
        dropout: float = 0.3,
        per_head: bool = True,
    ):
        _require(features=features, hidden=hidden, kind=int)
        _require(dropout=dropout, kind=(int, float))
        if not isinstance(per_head, bool):
            raise ValueError(f"per_head={per_head!r} must be true or false")
        if features < 1 or hidden < 1:
            raise ValueError(f"features={features} and hidden={hidden} must be >= 1")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        super().__init__(num_kv_heads, key_scale_init)
        self.num_features = features
        self.per_head = per_head
        self.hidden = hidden
        self.q_mlp = HeadwiseMLP(num_heads, head_dim, hidden, features, dropout, per_head)
        self.k_mlp = HeadwiseMLP(num_kv_heads, head_dim, hidden, features, dropout, per_head)

    def _query(self, q):
        return self.q_mlp(q).abs()

    def _key(self, k):
        return self.k_mlp(k).abs()

    def settings(self) -> dict:
        return {**super().settings(), "hidden": self.hidden, "per_head": self.per_head}


class _Projected(FeatureMap):
    """Maps applied to an optional learned projection ``d -> D'`` (per head; identity when D' is null).

    The projection starts as one random orthonormal draw per KV head, shared by its query heads, so
    the untrained kernel compares q and k in the same coordinates.
    """

    def __init__(self, head_dim, num_heads, num_kv_heads, features, key_scale_init, seed):
        super().__init__(num_kv_heads, key_scale_init)
        if features is None:
            self.num_features, self.w_q, self.w_k = head_dim, None, None
            return
        _require(features=features, kind=int)
        if features < 1:
            raise ValueError(f"features={features} must be >= 1 (or null for D' = head_dim)")
        self.num_features = features
        w = _orthonormal(num_kv_heads, head_dim, features, _generator(seed))
        self.w_k = nn.Parameter(w)
        self.w_q = nn.Parameter(_by_kv_head(w, num_heads))

    def _project(self, x, w):
        return x if w is None else headwise_matmul(x, w)

    def _query(self, q):
        return self._act(self._project(q, self.w_q))

    def _key(self, k):
        return self._act(self._project(k, self.w_k))


def _orthonormal(heads: int, dim: int, out: int, gen: torch.Generator) -> torch.Tensor:
    """``[heads, dim, out]`` with orthonormal columns (rows when ``out > dim``), one draw per head."""
    q, _ = torch.linalg.qr(torch.randn(heads, max(dim, out), max(dim, out), generator=gen))
    return q[:, :dim, :out].contiguous()


class Elu1(_Projected):
    """``elu(x) + 1`` (Katharopoulos et al., 2020); D' = d unless ``features`` sets a projection."""

    def __init__(self, head_dim, num_heads, num_kv_heads, features=None, key_scale_init=1e-4, seed=0):
        super().__init__(head_dim, num_heads, num_kv_heads, features, key_scale_init, seed)

    @staticmethod
    def _act(x):
        return nn.functional.elu(x) + 1


class Relu(_Projected):
    """``relu(x)``; a query may get all-zero features, which the joint normaliser reads as an empty state."""

    def __init__(self, head_dim, num_heads, num_kv_heads, features=None, key_scale_init=1e-4, seed=0):
        super().__init__(head_dim, num_heads, num_kv_heads, features, key_scale_init, seed)

    @staticmethod
    def _act(x):
        return nn.functional.relu(x)


class InputProjection(nn.Module):
    """An optional learned ``d -> d`` map of q (per query head) and k (per KV head) in front of a fixed
    feature map, starting at the identity so the untrained map is exactly the principled one. Without
    it a fixed map (Performer, DiJiang) can learn nothing but its key scale."""

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int, enabled: bool):
        super().__init__()
        if not isinstance(enabled, bool):
            raise ValueError(f"learn_projection={enabled!r} must be true or false")
        eye = torch.eye(head_dim)
        self.w_q = nn.Parameter(eye.repeat(num_heads, 1, 1)) if enabled else None
        self.w_k = nn.Parameter(eye.repeat(num_kv_heads, 1, 1)) if enabled else None

    def query(self, q):
        return q if self.w_q is None else headwise_matmul(q, self.w_q)

    def key(self, k):
        return k if self.w_k is None else headwise_matmul(k, self.w_k)


def orthogonal_gaussian(rows: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """FAVOR+ projections ``[rows, dim]``: orthogonal blocks from QR of Gaussians, each row rescaled
    to the norm of a Gaussian vector (chi-distributed), so every row is marginally N(0, I)."""
    blocks = []
    for _ in range(math.ceil(rows / dim)):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
        blocks.append(q.T)
    norms = torch.randn(rows, dim, generator=gen).norm(dim=-1, keepdim=True)
    return torch.cat(blocks)[:rows] * norms


class Performer(FeatureMap):
    """FAVOR+ positive random features of the softmax kernel (Choromanski et al., 2021).

    ``phi(x) = m^(-1/2) exp(w_i . x - |x|^2 / 2)`` with ``x = q / d^(1/4)``, so that
    ``E[phi(q) . phi(k)] = exp(q . k / sqrt(d))``: the state is an unbiased estimate of the evicted
    tokens' softmax mass at its absolute scale, as the joint normaliser needs. Stabiliser: none that
    depends on other tokens (a per-sequence max over keys is not causal): keys are shifted by the
    constant ``max_i |w_i|^2 / 2``, which bounds ``w . x - |x|^2 / 2`` whatever ``x``, and each query by
    its own maximum; both shifts return to the normaliser as a log offset (:meth:`query_with_offset`).
    The key's learned log-scale sits inside the exponent. ``omega [D', d]`` is a fixed buffer;
    ``learn_projection`` puts a learned map (identity at the start) in front of it.
    """

    def __init__(self, head_dim, num_heads, num_kv_heads, features=8, key_scale_init=1e-4, seed=0,
                 learn_projection=True):
        _require(features=features, kind=int)
        if features < 1:
            raise ValueError(f"features={features} must be >= 1")
        super().__init__(num_kv_heads, key_scale_init)
        self.num_features = features
        self.seed = seed
        self.projection = InputProjection(head_dim, num_heads, num_kv_heads, learn_projection)
        self.register_buffer("omega", orthogonal_gaussian(features, head_dim, _generator(seed)))

    def _log_features(self, x):
        x = x * x.shape[-1] ** -0.25
        return x @ self.omega.to(x.dtype).T - (x * x).sum(-1, keepdim=True) / 2 - 0.5 * math.log(self.num_features)

    def _key_shift(self) -> float:
        """A constant bound of the key's log-features without its scale: ``max_i |w_i|^2 / 2``."""
        return float(self.omega.square().sum(-1).max()) / 2

    def query(self, q):
        features, offset = self.query_with_offset(q)
        return features * offset.exp()[..., None]

    def query_with_offset(self, q):
        """Shifted by the query's own maximum (causal: it reads nothing but this query) plus the key
        shift, so every stored key feature is ``<= key scale`` and every query feature ``<= 1``: sums and
        their gradients (``num / den^2``) stay finite however long the sequence. Exact: ``phi . psi``
        gets back ``exp(offset)`` in the normaliser's log space."""
        logf = self._log_features(self.projection.query(q))
        top = logf.detach().amax(-1)
        return (logf - top[..., None]).exp(), top + self._key_shift()

    def key(self, k):
        return (self._log_features(self.projection.key(k)) + self.log_key_scale.to(k.dtype) - self._key_shift()).exp()

    def settings(self) -> dict:
        return {**super().settings(), "seed": self.seed, "learn_projection": self.projection.w_q is not None}


def taylor_rank(features: int) -> int:
    """The largest ``r`` whose Taylor map fits in ``features``: ``1 + r + r (r + 1) / 2 <= features``."""
    r = 0
    while 1 + (r + 1) + (r + 1) * (r + 2) // 2 <= features:
        r += 1
    return r


class Taylor(FeatureMap):
    """BASED's second-order Taylor map of ``exp`` on a learned projection of q and k to ``r`` dimensions.

    ``phi(x) = [1, y / r^(1/4), y_i y_j c_ij / (sqrt(2) sqrt(r)) for i <= j]`` with ``y = x W`` and
    ``c_ii = 1``, ``c_ij = sqrt(2)`` (the symmetric pair merged), so
    ``phi(q) . phi(k) = 1 + a + a^2 / 2`` with ``a = y_q . y_k / sqrt(r)``: positive (>= 1/2) and
    ``D' = 1 + r + r (r + 1) / 2``, r the largest that fits in ``features`` (8 -> r = 2, D' = 6;
    32 -> r = 6, D' = 28). ``W`` starts as one Gaussian draw per KV head (shared by its query heads)
    scaled so that ``a`` matches ``q . k / sqrt(d)`` on average.
    """

    def __init__(self, head_dim, num_heads, num_kv_heads, features=8, key_scale_init=1e-4, seed=0):
        _require(features=features, kind=int)
        r = taylor_rank(features)
        if r < 1:
            raise ValueError(f"features={features} is too small for the Taylor map (at least 3: r = 1, D' = 3)")
        super().__init__(num_kv_heads, key_scale_init)
        self.rank = r
        self.num_features = 1 + r + r * (r + 1) // 2
        std = (r * head_dim) ** -0.25
        w = torch.randn(num_kv_heads, head_dim, r, generator=_generator(seed)) * std
        self.w_k = nn.Parameter(w)
        self.w_q = nn.Parameter(_by_kv_head(w, num_heads))
        i, j = torch.triu_indices(r, r)
        self.register_buffer("pair_i", i, persistent=False)
        self.register_buffer("pair_j", j, persistent=False)
        coef = torch.where(i == j, 1.0, math.sqrt(2.0)) / (math.sqrt(2.0) * math.sqrt(r))
        self.register_buffer("pair_coef", coef, persistent=False)

    def _features(self, x, w):
        y = headwise_matmul(x, w)
        second = y[..., self.pair_i] * y[..., self.pair_j] * self.pair_coef.to(x.dtype)
        return torch.cat([torch.ones_like(y[..., :1]), y * self.rank ** -0.25, second], dim=-1)

    def _query(self, q):
        return self._features(q, self.w_q)

    def _key(self, k):
        return self._features(k, self.w_k)

    def settings(self) -> dict:
        return {**super().settings(), "rank": self.rank}


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``C [n, n]``: row ``f`` is frequency ``f``."""
    f = torch.arange(n, dtype=torch.float64)[:, None]
    t = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi / n * (t + 0.5) * f) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.float()


class DiJiang(FeatureMap):
    """DiJiang's frequency-domain map (Chen et al., 2024): ``phi(x) = softmax(x P / d^(1/4))`` with
    ``P = C^T diag(w)`` over the ``D'`` lowest DCT frequencies, ``C`` the orthonormal DCT-II matrix and
    ``w = Phi^-1(u)``, ``u ~ U(0, 1)`` drawn from ``seed`` (weighted quasi-Monte-Carlo). ``P`` is a fixed
    buffer. DiJiang's per-position decay belongs to ``gating=decay``, not to the map. ``learn_projection``
    puts a learned map (identity at the start) in front of it.
    """

    def __init__(self, head_dim, num_heads, num_kv_heads, features=8, key_scale_init=1e-4, seed=0,
                 learn_projection=True):
        _require(features=features, kind=int)
        if not 1 <= features <= head_dim:
            raise ValueError(f"features={features} must be between 1 and head_dim={head_dim} (DCT frequencies)")
        super().__init__(num_kv_heads, key_scale_init)
        self.num_features = features
        self.seed = seed
        u = torch.rand(features, generator=_generator(seed), dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
        weights = torch.special.ndtri(u).float()
        self.projection = InputProjection(head_dim, num_heads, num_kv_heads, learn_projection)
        self.register_buffer("proj", dct_matrix(head_dim)[:features].T * weights)

    def _features(self, x):
        return torch.softmax(torch.matmul(x, self.proj.to(x.dtype)) * x.shape[-1] ** -0.25, dim=-1)

    def _query(self, q):
        return self._features(self.projection.query(q))

    def _key(self, k):
        return self._features(self.projection.key(k))

    def settings(self) -> dict:
        return {**super().settings(), "seed": self.seed, "learn_projection": self.projection.w_q is not None}


class Hedgehog(FeatureMap):
    """Hedgehog (Zhang et al., 2024): ``phi(x) = [softmax(x W), softmax(-x W)]`` with a learned
    ``W [d, D'/2]`` per head (queries and keys separately), initialised to the identity's first columns."""

    def __init__(self, head_dim, num_heads, num_kv_heads, features=8, key_scale_init=1e-4):
        _require(features=features, kind=int)
        if features < 2 or features % 2:
            raise ValueError(f"features={features} must be even and >= 2 (two softmaxes of D'/2)")
        super().__init__(num_kv_heads, key_scale_init)
        self.num_features = features
        eye = torch.eye(head_dim, features // 2)
        self.w_q = nn.Parameter(eye.repeat(num_heads, 1, 1))
        self.w_k = nn.Parameter(eye.repeat(num_kv_heads, 1, 1))

    @staticmethod
    def _features(x, w):
        y = headwise_matmul(x, w)
        return torch.cat([torch.softmax(y, -1), torch.softmax(-y, -1)], dim=-1)

    def _query(self, q):
        return self._features(q, self.w_q)

    def _key(self, k):
        return self._features(k, self.w_k)
