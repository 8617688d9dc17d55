"""The ops against their float64 references: every form of the evicted-stream linear attention, the
LESS parallel form (schedule + sparse part + state) against explicit kept and evicted sets, and the
joint normaliser's edge cases, in float32, bfloat16 and float16 inputs."""

import pytest
import torch

from less_exp.adapter.compression import Compression
from less_exp.ops import (
    attention_logits,
    blocked_sparse_attention,
    chunk_linear_attention,
    gather_stream,
    joint_normalize,
    linear_attention,
    parallel_linear_attention,
    recurrent_linear_attention,
    sparse_attention,
)
from less_exp.ops.naive import naive_less_attention, naive_linear_attention
from less_exp.policies import H2O, TOVA, Sink, Window
from less_exp.state import Elu1, JointNormalizer, LessMLP, LessStates

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _stream(B=2, Hkv=2, G=3, T=21, D=5, d=4, seed=0, holes=True):
    gen = torch.Generator().manual_seed(seed)
    phi = torch.rand(B, Hkv, G, T, D, generator=gen)
    psi = torch.rand(B, Hkv, T, D, generator=gen)
    if holes:  # steps where nothing was evicted
        psi = psi * (torch.rand(B, Hkv, T, 1, generator=gen) > 0.3)
    v = torch.randn(B, Hkv, T, d, generator=gen)
    initial = torch.cat([torch.randn(B, Hkv, D, d, generator=gen), torch.rand(B, Hkv, D, 1, generator=gen)], -1)
    return phi, psi, v, initial


FORMS = {
    "parallel": parallel_linear_attention,
    "recurrent": recurrent_linear_attention,
    **{f"chunk{c}": (lambda c: lambda *a, g=None: chunk_linear_attention(*a, chunk_size=c, g=g))(c) for c in (1, 7, 64, 21)},
    "dispatch": linear_attention,
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("with_initial", [False, True])
def test_linear_attention_forms_match_naive(form, with_initial):
    phi, psi, v, initial = _stream()
    initial = initial if with_initial else None
    num, den, final = FORMS[form](phi, psi, v, initial)
    ref_num, ref_den, ref_final = naive_linear_attention(phi, psi, v, initial)
    torch.testing.assert_close(num.double(), ref_num, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(den.double(), ref_den, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final.double(), ref_final, atol=1e-5, rtol=1e-5)


def test_chunk_gradients_match_parallel():
    phi, psi, v, initial = _stream(T=30)
    grads = []
    for form in (parallel_linear_attention, lambda *a: chunk_linear_attention(*a, chunk_size=8)):
        leaves = [x.clone().requires_grad_(True) for x in (phi, psi, v, initial)]
        num, den, final = form(*leaves)
        (num.square().sum() + den.sum() + final.square().sum()).backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_one_step_at_a_time_equals_one_pass():
    """Decoding carries the state from step to step; the result must equal a single chunked pass."""
    phi, psi, v, initial = _stream(T=12)
    whole = chunk_linear_attention(phi, psi, v, initial, chunk_size=5)
    state, nums = initial, []
    for t in range(12):
        num, _, state = linear_attention(phi[:, :, :, t : t + 1], psi[:, :, t : t + 1], v[:, :, t : t + 1], state)
        nums.append(num)
    torch.testing.assert_close(torch.cat(nums, 3), whole[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, whole[2], atol=1e-5, rtol=1e-5)


def _qkv(B=2, H=4, Hkv=2, S=14, d=8, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, S, d, generator=gen).to(dtype) for h in (H, Hkv, Hkv)]


def _comp(policy, states, H=4, Hkv=2, d=8):
    return Compression(policy=policy, states=states, num_layers=1, num_heads=H, num_kv_heads=Hkv, head_dim=d,
                       max_positions=4096, chunk_size=4)


def _states(kind="mlp", d=8, H=4, Hkv=2, scale=1.0):
    torch.manual_seed(0)
    make = {
        "mlp": lambda: LessMLP(d, H, Hkv, hidden=16, features=4, key_scale_init=scale, dropout=0.0),
        "elu1": lambda: Elu1(d, H, Hkv, key_scale_init=scale),
    }[kind]
    return LessStates.build(make, JointNormalizer, 1, d).eval()


POLICIES = [Window(recent=4), Sink(sink=1, recent=3), H2O(heavy=2, recent=2), TOVA(heavy=3, recent=1)]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
@pytest.mark.parametrize("kind", [None, "mlp", "elu1"])
@pytest.mark.parametrize("padded", [False, True])
def test_parallel_form_matches_naive(policy, kind, padded):
    q, k, v = _qkv()
    valid = torch.ones(2, 14, dtype=torch.bool)
    if padded:
        valid[1, :3] = False
        valid[1, 9] = False  # a hole in the middle is skipped like left padding
    states = None if kind is None else _states(kind)
    comp = _comp(policy, states)
    out, prefill = comp.parallel(0, q, k, v, valid, 8**-0.5)
    keep = prefill.schedule.keep
    phi = psi = None
    if states is not None:
        phi, psi = states[0].phi(q), states[0].psi(k)
    ref = naive_less_attention(q, k, v, keep, 8**-0.5, phi, psi, valid)
    rows = valid[:, None, :, None]
    torch.testing.assert_close((out * rows).double(), ref * rows, atol=1e-5, rtol=1e-5)
    if states is not None:
        plain, _ = _comp(policy, None).parallel(0, q, k, v, valid, 8**-0.5)
        assert (out - plain).abs().max() > 1e-2, "a state with weight must change the output"


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_evicted_stream_is_what_the_keep_masks_drop(policy):
    """One token leaves per step past the budget and never comes back: the stream is the mask's diff."""
    q, k, _ = _qkv()
    valid = torch.ones(2, 14, dtype=torch.bool)
    valid[0, :2] = False
    sched = policy.keep_mask(policy.budget(), valid, 2, attention_logits(q, k, 0.35))
    B, Hkv, S, _ = sched.keep.shape
    for b in range(B):
        for h in range(Hkv):
            gone = set()
            for t in range(S):
                if not valid[b, t]:
                    assert sched.evicted[b, h, t] == -1
                    continue
                if sched.evicted[b, h, t] >= 0:
                    gone.add(int(sched.evicted[b, h, t]))
                dropped = {s for s in range(t + 1) if valid[b, s] and not sched.keep[b, h, t, s]}
                assert dropped == gone, (b, h, t)


def test_untrained_state_is_the_plain_policy():
    q, k, v = _qkv()
    plain, _ = _comp(H2O(heavy=2, recent=2), None).parallel(0, q, k, v, None, 0.35)
    fresh, _ = _comp(H2O(heavy=2, recent=2), _states(scale=1e-4)).parallel(0, q, k, v, None, 0.35)
    torch.testing.assert_close(fresh, plain, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("policy", [Sink(sink=1, recent=3), H2O(heavy=2, recent=2)], ids=lambda p: p.name)
def test_half_precision_inputs_give_the_float32_result(dtype, policy):
    """Inside, everything is float32: half inputs differ from float32 ones only by their own rounding."""
    q, k, v = _qkv(dtype=dtype)
    states = _states(scale=1e-4)  # the untrained start: the state's share is tiny, where float16 used to give NaN
    out, prefill = _comp(policy, states).parallel(0, q, k, v, None, 8**-0.5)
    ref, ref_prefill = _comp(policy, states).parallel(0, q.float(), k.float(), v.float(), None, 8**-0.5)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(prefill.schedule.keep, ref_prefill.schedule.keep)


def test_joint_normalize_edge_cases():
    gen = torch.Generator().manual_seed(0)
    o_sparse = torch.randn(2, 3, 4, generator=gen)
    lse = torch.tensor([[-200.0, 0.0, 90.0], [5.0, -5.0, 300.0]])
    num, den = torch.zeros(2, 3, 4), torch.zeros(2, 3)
    # an empty state adds exactly nothing, whatever the sparse part's scale, with finite gradients
    leaves = [x.clone().requires_grad_(True) for x in (o_sparse, lse, num, den)]
    out = joint_normalize(*leaves)
    assert torch.equal(out, o_sparse)
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    # half-precision inputs whose denominator underflows in their own dtype stay exact in float32
    tiny = torch.full((2, 3), 1e-30)
    ref = joint_normalize(o_sparse, lse, num + 1e-30, tiny)
    assert torch.isfinite(ref).all()
    # the state's share follows the log-space ratio of the two denominators
    mixed = joint_normalize(o_sparse, torch.zeros(2, 3), torch.ones(2, 3, 4), torch.ones(2, 3))
    torch.testing.assert_close(mixed, 0.5 * o_sparse + 0.5)


def test_state_gradients_reach_every_state_parameter_and_nothing_else():
    q, k, v = [x.requires_grad_(True) for x in _qkv()]
    states = _states().train()
    out, _ = _comp(Sink(sink=1, recent=3), states).parallel(0, q.detach(), k.detach(), v.detach(), None, 0.35)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in states.parameters())
    assert q.grad is None and k.grad is None and v.grad is None


def test_gather_stream_masks_steps_without_eviction():
    x = torch.arange(12.0).reshape(1, 1, 4, 3)
    out = gather_stream(x, torch.tensor([[[-1, 2, 0, -1]]]))
    assert torch.equal(out[0, 0], torch.tensor([[0.0, 0, 0], [6, 7, 8], [0, 1, 2], [0, 0, 0]]))


def test_sparse_attention_is_float32_for_half_inputs():
    q, k, v = _qkv(dtype=torch.bfloat16)
    logits = attention_logits(q, k, 0.35)
    keep = torch.ones(2, 2, 14, 14, dtype=torch.bool).tril()
    out, lse, probs = sparse_attention(logits, keep, v)
    assert logits.dtype == out.dtype == lse.dtype == probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(lse))


def _gates(kind, B=2, Hkv=2, T=21, D=5, seed=3, strength=1.0):
    gen = torch.Generator().manual_seed(seed)
    shape = (B, Hkv, T) if kind == "scalar" else (B, Hkv, T, D)
    return torch.nn.functional.logsigmoid(torch.randn(shape, generator=gen) * 2 + 1) * strength


@pytest.mark.parametrize("kind", ["scalar", "vector"])
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("with_initial", [False, True])
def test_gated_forms_match_naive(kind, form, with_initial):
    phi, psi, v, initial = _stream()
    g = _gates(kind)
    initial = initial if with_initial else None
    num, den, final = FORMS[form](phi, psi, v, initial, g=g)
    ref_num, ref_den, ref_final = naive_linear_attention(phi, psi, v, initial, g=g)
    torch.testing.assert_close(num.double(), ref_num, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(den.double(), ref_den, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final.double(), ref_final, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["scalar", "vector"])
def test_zero_log_gates_are_no_gates(kind):
    phi, psi, v, initial = _stream()
    gated = chunk_linear_attention(phi, psi, v, initial, chunk_size=8, g=torch.zeros_like(_gates(kind)))
    plain = chunk_linear_attention(phi, psi, v, initial, chunk_size=8)
    for a, b in zip(gated, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["scalar", "vector"])
def test_gated_chunk_gradients_are_finite_and_match_parallel(kind):
    """Strong gates over a long stream: every exponent is a causal difference <= 0, so no overflow and
    no NaN gradient from the masked upper triangle."""
    phi, psi, v, initial = _stream(T=300)
    g = _gates(kind, T=300, strength=20.0)
    grads = []
    for form in (lambda *a: parallel_linear_attention(*a, g=g_), lambda *a: chunk_linear_attention(*a, chunk_size=32, g=g_)):
        leaves = [x.clone().requires_grad_(True) for x in (phi, psi, v, initial, g)]
        g_ = leaves[-1]
        num, den, final = form(*leaves[:4])
        (num.square().sum() + den.sum() + final.square().sum()).backward()
        assert all(torch.isfinite(x.grad).all() for x in leaves)
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):  # float32 sums over 300 steps: compare at the gradient's own scale
        assert (a - b).abs().max() <= 1e-3 * a.abs().max()


@pytest.mark.parametrize("grad", [False, True])
def test_sparse_attention_matches_the_float64_softmax(grad):
    gen = torch.Generator().manual_seed(3)
    logits = 8 * torch.randn(2, 2, 3, 33, 33, generator=gen)
    keep = torch.rand(2, 2, 33, 33, generator=gen) < 0.4
    keep |= torch.eye(33, dtype=torch.bool)
    keep[0, 1, 7] = False  # a query with no kept key: lse -inf, as the cache would see an empty row
    v = torch.randn(2, 2, 33, 16, generator=gen)
    masked = logits.double().masked_fill(~keep[:, :, None], float("-inf"))
    lse_ref = masked.logsumexp(-1)
    probs_ref = torch.softmax(masked, -1)
    x = logits.clone().requires_grad_(grad)
    out, lse, probs = sparse_attention(x, keep, v)
    assert torch.isneginf(lse[0, 1, :, 7]).all()
    rows = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[rows].double(), lse_ref[rows], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(probs[rows].double(), probs_ref[rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[rows].double(), (probs_ref @ v.double()[:, :, None])[rows], rtol=1e-5, atol=1e-5)
    if grad:
        y = logits.double().clone().requires_grad_(True)
        ref = y.masked_fill(~keep[:, :, None], float("-inf"))
        keep_rows = rows[..., None].expand_as(ref)
        loss_ref = (torch.softmax(ref, -1) @ v.double()[:, :, None])[rows].sum() + ref.logsumexp(-1)[rows].sum()
        loss_ref.backward()
        (out[rows].sum() + lse[rows].sum()).backward()
        torch.testing.assert_close(x.grad.double()[keep_rows], y.grad[keep_rows], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["sink", "random"])
def test_blocked_sparse_attention_equals_the_whole_form_with_its_gradients(dtype, kind):
    """Query blocks over only the kept columns give the whole form's output and log-sum-exp, and the
    same gradients (recomputed per block), in every input dtype."""
    gen = torch.Generator().manual_seed(5)
    B, H, Hkv, S, d = 2, 4, 2, 45, 8
    q, k, v = (torch.randn(B, n, S, d, generator=gen).to(dtype) for n in (H, Hkv, Hkv))
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, :6] = False
    if kind == "sink":
        policy = Sink(sink=2, recent=7)
        keep = policy.keep_mask(policy.budget(length=S), valid, Hkv).keep
    else:
        keep = (torch.rand(B, Hkv, S, S, generator=gen) < 0.3).tril() | torch.eye(S, dtype=torch.bool)
    grads = []
    for blocked in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        if blocked:
            out, lse = blocked_sparse_attention(*leaves, keep, 0.3, block=8)
        else:
            out, lse, _ = sparse_attention(attention_logits(leaves[0], leaves[1], 0.3), keep, leaves[2])
        (out.square().sum() + lse.sum()).backward()
        grads.append([out.detach(), lse.detach(), *(t.grad for t in leaves)])
    for whole, block in zip(*grads):  # outputs are float32; a half leaf's gradient is within an ulp of its scale
        assert block.dtype == whole.dtype
        ulp = 1e-5 if whole.dtype == torch.float32 else torch.finfo(whole.dtype).eps
        torch.testing.assert_close(block, whole, rtol=ulp, atol=ulp * float(whole.abs().max()))
    with torch.no_grad():
        out, lse = blocked_sparse_attention(q, k, v, keep, 0.3, block=8)
    torch.testing.assert_close(out, grads[0][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("heads", [4, 1], ids=["per-head", "shared"])
def test_headwise_matmul_equals_the_broadcast_product(dtype, heads):
    """One weight matrix per head, rows of the batch folded together: the same values and gradients
    as ``torch.matmul``'s broadcast (which copies the weights for every row)."""
    from less_exp.ops import headwise_matmul

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 6, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(heads, 6, 7, generator=gen).requires_grad_()
    out = headwise_matmul(x, w)
    reference = torch.matmul(x.detach().double(), w.detach().double())
    tol = {torch.float32: 1e-5, torch.bfloat16: 0.1, torch.float16: 0.01}[dtype]
    assert out.dtype == dtype and out.shape == (3, 4, 5, 7)
    torch.testing.assert_close(out.double(), reference, atol=tol, rtol=tol)
    out.float().square().sum().backward()
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    torch.matmul(xd, wd).square().sum().backward()
    torch.testing.assert_close(w.grad.double(), wd.grad, atol=tol * 50, rtol=tol * 5)
    torch.testing.assert_close(x.grad.double(), xd.grad, atol=tol * 50, rtol=tol * 5)
    unbatched = headwise_matmul(x.detach()[0], w.detach())  # [H, S, d]: any leading dimensions
    torch.testing.assert_close(unbatched.double(), reference[0], atol=tol, rtol=tol)
