"""Loss pieces against hand-computed values and a plain-Python loop reference (SPEC section 4)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2rpo_jax.loss import (
    group_advantages,
    kl_penalty,
    loss_metrics,
    loss_parts,
    loss_sums,
    policy_loss,
)
from g2rpo_jax.logprobs import token_log_probs

LOSS_TYPES = ["grpo", "bnpo", "dapo", "dr_grpo"]


# --------------------------------------------------------------------------- advantages
def test_group_advantages_group_scaling():
    adv = group_advantages(jnp.asarray([1, 0, 0, 1, 0, 0, 0, 0], jnp.float32), 4)
    # group 1: mean 0.5, deviations +-0.5, Bessel var = 4*0.25/3 = 1/3, std = 0.5773503
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # 0.865875...
    np.testing.assert_allclose(np.asarray(adv), [a, -a, -a, a, 0, 0, 0, 0], rtol=1e-6, atol=0)
    assert adv.dtype == jnp.float32
    # distinct values: [1,2,3,4]: mean 2.5, var (2.25+0.25+0.25+2.25)/3 = 5/3
    adv = group_advantages(jnp.asarray([1.0, 2.0, 3.0, 4.0]), 4)
    s = math.sqrt(5 / 3) + 1e-4
    np.testing.assert_allclose(np.asarray(adv), [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s], rtol=1e-6)


def test_group_advantages_batch_and_none():
    r = jnp.asarray([1, 0, 0, 1, 0, 0, 0, 0], jnp.float32)
    # batch: centring per group, std over all 8 with ddof=1: mean 0.25, SS = 2*0.75^2 + 6*0.25^2 = 1.5,
    # var = 1.5/7, std = 0.4629100
    a = 0.5 / (math.sqrt(1.5 / 7) + 1e-4)
    np.testing.assert_allclose(np.asarray(group_advantages(r, 4, "batch")), [a, -a, -a, a, 0, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(group_advantages(r, 4, "none")), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], atol=0
    )
    with pytest.raises(ValueError, match="group.*batch.*none"):
        group_advantages(r, 4, "per_token")
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(r, 3)


# --------------------------------------------------------------------------- log-probs and KL
def test_token_log_probs():
    # logits [0, ln 3] -> softmax [1/4, 3/4]; shift by 1000 must not change anything
    logits = jnp.asarray([[[0.0, math.log(3.0)], [1000.0, 1000.0 + math.log(3.0)]]])
    targets = jnp.asarray([[1, 0]])
    lp = token_log_probs(logits, targets)
    assert lp.shape == (1, 2) and lp.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lp), [[math.log(0.75), math.log(0.25)]], rtol=1e-4)
    # bf16 logits are upcast
    assert token_log_probs(logits.astype(jnp.bfloat16), targets).dtype == jnp.float32


def test_kl_estimators_by_hand():
    logp = jnp.asarray([-1.0, -2.0, -20.0])
    ref = jnp.asarray([-2.0, -1.0, 0.0])
    # k1 = logp - ref
    np.testing.assert_allclose(np.asarray(kl_penalty(logp, ref, "k1")), [1.0, -1.0, -20.0], rtol=1e-6)
    # k3 with d = ref - logp: d=-1 -> e^-1 + 1 - 1 = 0.3678794; d=1 -> e - 2 = 0.7182818; d=20 -> e^20 - 21
    k3 = kl_penalty(logp, ref, "k3")
    np.testing.assert_allclose(np.asarray(k3), [math.exp(-1), math.e - 2, math.exp(20) - 21], rtol=1e-5)
    # low_var: k3 clipped to [-10, 10]
    lv = kl_penalty(logp, ref, "low_var")
    np.testing.assert_allclose(np.asarray(lv), [math.exp(-1), math.e - 2, 10.0], rtol=1e-5)
    # k3 default, and exactly 0 when the policies agree
    assert float(kl_penalty(jnp.asarray(-3.0), jnp.asarray(-3.0))) == 0.0
    with pytest.raises(ValueError, match="k1.*k3.*low_var"):
        kl_penalty(logp, ref, "k2")


# --------------------------------------------------------------------------- aggregation by hand
def test_loss_types_hand_example():
    # rho = 1 (logp == old), beta = 0 -> token loss = -A. Row 0: A=2, 2 tokens; row 1: A=-1, 3 tokens;
    # row 2: A=5 but no tokens at all.
    logp = jnp.full((3, 4), -0.7)
    A = jnp.asarray([2.0, -1.0, 5.0])
    mask = jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], bool)
    kw = dict(beta=0.0, max_completion_length=4)
    # grpo: row means -2 and +1, empty row excluded: (-2 + 1) / 2 = -0.5
    # bnpo / dapo: (-2-2+1+1+1) / 5 = -0.2
    # dr_grpo: -1 / (B * max_len) = -1 / (3 * 4)
    expected = {"grpo": -0.5, "bnpo": -0.2, "dapo": -0.2, "dr_grpo": -1 / 12}
    for lt, want in expected.items():
        loss, metrics = policy_loss(logp, logp, None, A, mask, None, loss_type=lt, **kw)
        np.testing.assert_allclose(float(loss), want, rtol=1e-6, err_msg=lt)
        assert "kl" not in metrics  # no ref_logp given
        assert float(metrics["clip_ratio/region_mean"]) == 0.0
    # dr_grpo with max_completion_length=None uses T=4 as well; 10 gives -1/30
    loss, _ = policy_loss(logp, logp, None, A, mask, None, loss_type="dr_grpo", beta=0.0, max_completion_length=10)
    np.testing.assert_allclose(float(loss), -1 / 30, rtol=1e-6)
    # loss_parts: the numerator/denominator form for gradient accumulation
    num, den = loss_parts(-A[:, None] * jnp.ones((3, 4)), mask, "grpo")
    assert float(num) == -1.0 and float(den) == 2.0


def test_loss_sums_add_up_over_row_splits():
    """Sums of two halves of the rows equal the whole batch's sums, and loss_metrics gives token means."""
    rng = np.random.default_rng(0)
    logp, old, ref = (jnp.asarray(rng.normal(size=(4, 5)) * 0.3 - 1.0, jnp.float32) for _ in range(3))
    A = jnp.asarray([1.0, -2.0, 0.5, 3.0])
    mask = jnp.asarray(rng.random((4, 5)) < 0.7)
    kw = dict(loss_type="dapo", max_completion_length=5, beta=0.1, epsilon_low=0.1, epsilon_high=0.1)
    whole = loss_sums(logp, old, ref, A, mask, None, **kw)
    halves = [loss_sums(logp[s], old[s], ref[s], A[s], mask[s], None, **kw) for s in (slice(0, 2), slice(2, 4))]
    for name, value in whole.items():
        np.testing.assert_allclose(float(halves[0][name] + halves[1][name]), float(value), rtol=1e-6, err_msg=name)
    assert float(whole["tokens"]) == float(np.sum(np.asarray(mask)))
    assert float(whole["clip_ratio/region_mean"]) > 0  # the 0.1 clip range is hit
    np.testing.assert_allclose(float(loss_metrics(whole)["kl"]), float(whole["kl"] / whole["tokens"]), rtol=1e-6)
    assert float(loss_metrics({"tokens": jnp.float32(0), "kl": jnp.float32(0)})["kl"]) == 0.0  # empty mask


# --------------------------------------------------------------------------- clipping
def test_clipping_by_hand():
    # one token per row; old_logp = 0 so rho = exp(logp)
    logp = jnp.log(jnp.asarray([[1.5], [1.5], [0.5], [0.5]]))
    old = jnp.zeros((4, 1))
    A = jnp.asarray([1.0, -1.0, -1.0, 1.0])
    mask = jnp.ones((4, 1), bool)
    # row0: rho 1.5, A=+1: -min(1.5, 1.2) = -1.2  (high clip active)
    # row1: rho 1.5, A=-1: -min(-1.5, -1.2) = 1.5 (unclipped term wins; not counted as clipped)
    # row2: rho 0.5, A=-1: -min(-0.5, -0.8) = 0.8 (low clip active)
    # row3: rho 0.5, A=+1: -min(0.5, 0.8) = -0.5
    # bnpo: (-1.2 + 1.5 + 0.8 - 0.5) / 4 = 0.15
    f = lambda lp: policy_loss(lp, old, None, A, mask, None, loss_type="bnpo", beta=0.0, max_completion_length=1)
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(logp)
    np.testing.assert_allclose(float(loss), 0.15, rtol=1e-5)
    assert float(metrics["clip_ratio/low_mean"]) == 0.25
    assert float(metrics["clip_ratio/high_mean"]) == 0.25
    assert float(metrics["clip_ratio/region_mean"]) == 0.5
    # d/dlogp: clipped rows 0, unclipped rows -rho*A / 4: row1 1.5/4, row3 -0.5/4
    np.testing.assert_allclose(np.asarray(grad)[:, 0], [0.0, 0.375, 0.0, -0.125], atol=1e-6)
    # clip-higher (eps_high 0.28): row0 becomes -1.28
    loss_hi, _ = policy_loss(logp, old, None, A, mask, None, loss_type="bnpo", beta=0.0, epsilon_high=0.28,
                             max_completion_length=1)
    np.testing.assert_allclose(float(loss_hi), (-1.28 + 1.5 + 0.8 - 0.5) / 4, rtol=1e-5)


# --------------------------------------------------------------------------- plain-Python reference
def _ref_loss(logp, old, ref, A, cmask, gmask, loss_type, beta, el, eh, est, gl, gamma, max_len):
    """Independent loop implementation of SPEC section 4 (floats, math module)."""
    B, T = len(logp), len(logp[0])
    tok = [[None] * T for _ in range(B)]
    kls = []
    for i in range(B):
        for t in range(T):
            on = cmask[i][t] and not (gl == "mask" and gmask[i][t])
            if not on:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            if gl == "guide" and gmask[i][t]:  # a teacher token's behaviour probability is 1
                rho = math.exp(logp[i][t])
            if gl in ("importance", "luffy") and gmask[i][t]:
                pi = math.exp(logp[i][t])
                l = -(pi / (pi + gamma)) * A[i]
            else:
                l = -min(rho * A[i], min(max(rho, 1 - el), 1 + eh) * A[i])
            d = ref[i][t] - logp[i][t]
            kl = {"k1": -d, "k3": math.exp(d) - d - 1, "low_var": min(max(math.exp(d) - d - 1, -10), 10)}[est]
            kls.append(kl)  # the metric averages the estimate over every token of the loss
            tok[i][t] = l + (0.0 if gl == "luffy" and gmask[i][t] else beta * kl)
    flat = [x for row in tok for x in row if x is not None]
    if loss_type == "grpo":
        means = [sum(x for x in row if x is not None) / sum(x is not None for x in row)
                 for row in tok if any(x is not None for x in row)]
        loss = sum(means) / len(means)
    elif loss_type in ("bnpo", "dapo"):
        loss = sum(flat) / len(flat)
    else:
        loss = sum(flat) / (B * max_len)
    return loss, sum(kls) / len(kls)


def _random_batch(seed=0, B=4, T=6):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.05, 0.95, (B, T))).astype(np.float32)
    old = (logp + rng.normal(0, 0.3, (B, T))).astype(np.float32)  # some ratios outside [0.8, 1.2]
    ref = (logp + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    A = rng.normal(0, 1, B).astype(np.float32)
    lengths = [6, 3, 5, 2]
    cmask = np.array([[t < n for t in range(T)] for n in lengths])
    gmask = np.zeros((B, T), bool)
    gmask[0, :3] = True   # guided row with a 3-token prefix
    gmask[3, :2] = True   # guided row that is ALL guidance: empty under guidance_loss="mask"
    # garbage (-inf) log-probs at pads must not leak into values or gradients
    logp[~cmask] = -np.inf
    return logp, old, ref, A, cmask, gmask


@pytest.mark.parametrize("guidance_loss", ["train", "mask", "importance", "luffy", "guide"])
@pytest.mark.parametrize("kl_estimator", ["k1", "k3", "low_var"])
def test_policy_loss_matches_python_reference(guidance_loss, kl_estimator):
    logp, old, ref, A, cmask, gmask = _random_batch()
    for lt in LOSS_TYPES:
        kw = dict(loss_type=lt, beta=0.04, epsilon_low=0.2, epsilon_high=0.28, kl_estimator=kl_estimator,
                  guidance_loss=guidance_loss, importance_gamma=0.1, max_completion_length=8)
        loss, metrics = policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(A),
                                    jnp.asarray(cmask), jnp.asarray(gmask), **kw)
        want, want_kl = _ref_loss(logp.tolist(), old.tolist(), ref.tolist(), A.tolist(), cmask.tolist(),
                                  gmask.tolist(), lt, 0.04, 0.2, 0.28, kl_estimator, guidance_loss, 0.1, 8)
        np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6, err_msg=lt)
        np.testing.assert_allclose(float(metrics["kl"]), want_kl, rtol=1e-5, atol=1e-6)


def test_mask_mode_equals_removing_guidance_tokens_and_no_nan_grads():
    logp, old, ref, A, cmask, gmask = _random_batch(seed=1)
    args = [jnp.asarray(x) for x in (old, ref, A)]
    for lt in LOSS_TYPES:
        kw = dict(loss_type=lt, beta=0.04, max_completion_length=8)
        masked = lambda lp: policy_loss(lp, *args, jnp.asarray(cmask), jnp.asarray(gmask),
                                        guidance_loss="mask", **kw)[0]
        removed = lambda lp: policy_loss(lp, *args, jnp.asarray(cmask & ~gmask), None,
                                         guidance_loss="train", **kw)[0]
        trained = lambda lp: policy_loss(lp, *args, jnp.asarray(cmask), jnp.asarray(gmask),
                                         guidance_loss="train", **kw)[0]
        v1, g1 = jax.value_and_grad(masked)(jnp.asarray(logp))
        v2, g2 = jax.value_and_grad(removed)(jnp.asarray(logp))
        assert float(v1) == pytest.approx(float(v2), rel=1e-6, abs=1e-7)
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-6, atol=1e-7)
        assert np.all(np.isfinite(np.asarray(g1)))
        assert np.all(np.asarray(g1)[gmask] == 0.0) and np.all(np.asarray(g1)[~cmask] == 0.0)
        # train mode does use them
        assert float(trained(jnp.asarray(logp))) != pytest.approx(float(v1))


def test_importance_mode_by_hand():
    # row 0: [guidance token with pi = 0.3, generated token with pi = 0.5], A = 2, gamma = 0.1, grpo
    logp = jnp.log(jnp.asarray([[0.3, 0.5]]))
    old = None  # one update per batch: old = stop_gradient(logp) -> rho = 1 on the generated token
    cmask = jnp.asarray([[True, True]])
    gmask = jnp.asarray([[True, False]])
    A = jnp.asarray([2.0])
    f = lambda lp: policy_loss(lp, old, None, A, cmask, gmask, guidance_loss="importance", importance_gamma=0.1,
                               beta=0.0, max_completion_length=2)[0]
    loss, grad = jax.value_and_grad(f)(logp)
    # guidance token: -(0.3 / 0.4) * 2 = -1.5; generated: -1 * 2 = -2; sequence mean = -1.75
    np.testing.assert_allclose(float(loss), -1.75, rtol=1e-6)
    # d/dlogp of -(pi/(pi+g)) A = -A * g * pi / (pi+g)^2 = -2 * 0.1 * 0.3 / 0.16 = -0.375, then / 2 tokens;
    # generated: -A / 2 = -1
    np.testing.assert_allclose(np.asarray(grad), [[-0.1875, -1.0]], rtol=1e-5)
    # the KL term still applies on guidance tokens: ref = logp - 1 on the guidance token -> d = -1,
    # k3 = e^-1 = 0.3678794; beta 0.1 -> guidance token -1.5 + 0.03678794; generated token ref = logp
    ref = logp - jnp.asarray([[1.0, 0.0]])
    loss_kl, metrics = policy_loss(logp, None, ref, A, cmask, gmask, guidance_loss="importance",
                                   importance_gamma=0.1, beta=0.1, max_completion_length=2)
    np.testing.assert_allclose(float(loss_kl), (-1.5 + 0.1 * math.exp(-1) - 2.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["kl"]), math.exp(-1) / 2, rtol=1e-6)
    # compare with train mode: guidance token would be -2 as well -> -2
    loss_train = policy_loss(logp, None, None, A, cmask, gmask, guidance_loss="train", beta=0.0,
                             max_completion_length=2)[0]
    np.testing.assert_allclose(float(loss_train), -2.0, rtol=1e-6)


def test_luffy_mode_by_hand():
    """LUFFY's published off-policy term: the `importance` case above, but the KL term leaves the
    off-policy (guidance) token alone; the on-policy token keeps the clipped ratio and its KL."""
    logp = jnp.log(jnp.asarray([[0.3, 0.5]]))
    cmask, gmask, A = jnp.asarray([[True, True]]), jnp.asarray([[True, False]]), jnp.asarray([2.0])
    ref = logp - jnp.asarray([[1.0, 0.5]])  # d = ref - logp: -1 on the trace token, -0.5 on the sampled one
    f = lambda lp: policy_loss(lp, None, ref, A, cmask, gmask, guidance_loss="luffy", importance_gamma=0.1,
                               beta=0.1, max_completion_length=2)
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(logp)
    k3 = lambda d: math.exp(d) - d - 1
    # off-policy token: -(0.3 / 0.4) * 2 = -1.5, no KL; on-policy: -2 + 0.1 * k3(-0.5); sequence mean over 2
    np.testing.assert_allclose(float(loss), (-1.5 + (-2.0 + 0.1 * k3(-0.5))) / 2, rtol=1e-6)
    # d/dlogp of -f(pi) A = -A * gamma * pi / (pi + gamma)^2 = -0.375 (f'(pi) grad pi, pi grad logp), / 2;
    # on-policy: (-A + beta * d k3 / d logp) / 2 with d k3 / d logp = 1 - e^d
    np.testing.assert_allclose(np.asarray(grad), [[-0.1875, (-2.0 + 0.1 * (1 - math.exp(-0.5))) / 2]], rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), (k3(-1.0) + k3(-0.5)) / 2, rtol=1e-6)  # metric: every token
    importance = policy_loss(logp, None, ref, A, cmask, gmask, guidance_loss="importance", importance_gamma=0.1,
                             beta=0.1, max_completion_length=2)[0]
    np.testing.assert_allclose(float(importance) - float(loss), 0.1 * k3(-1.0) / 2, rtol=1e-5)  # the only difference


def test_guide_mode_by_hand():
    """Guide-GRPO's correction: on a guidance token rho = pi / 1, clipped as any ratio (eps 0.2)."""
    logp = jnp.log(jnp.asarray([[0.3, 0.5], [0.9, 0.5]]))
    cmask, gmask = jnp.ones((2, 2), bool), jnp.asarray([[True, False], [True, False]])
    f = lambda lp, A: policy_loss(lp, None, None, A, cmask, gmask, guidance_loss="guide", beta=0.0, loss_type="bnpo",
                                  max_completion_length=2)
    # A = +2 on both rows: guidance tokens -min(pi A, clip(pi) A) = -pi A (pi <= 1 < 1.2): -0.6 and -1.8;
    # sampled tokens rho = 1: -2 each; token mean over 4
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(logp, jnp.asarray([2.0, 2.0]))
    np.testing.assert_allclose(float(loss), (-0.6 - 2.0 - 1.8 - 2.0) / 4, rtol=1e-6)
    # d/dlogp of -pi A = -pi A: -0.6 / 4 and -1.8 / 4; sampled: -2 / 4
    np.testing.assert_allclose(np.asarray(grad), [[-0.15, -0.5], [-0.45, -0.5]], rtol=1e-5)
    # A = -2: pi = 0.3 < 0.8 is clipped (constant 1.6, no gradient, counted); pi = 0.9 is not (1.8)
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(logp, jnp.asarray([-2.0, -2.0]))
    np.testing.assert_allclose(float(loss), (1.6 + 2.0 + 1.8 + 2.0) / 4, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), [[0.0, 0.5], [0.45, 0.5]], rtol=1e-5, atol=1e-7)
    assert float(metrics["clip_ratio/low_mean"]) == 0.25


def test_grpo_gradient_closed_form():
    # old = stop_gradient(logp), beta = 0: l_t = -A_i * rho_t with rho = 1, so
    # dL/dlogp_{i,t} = -A_i / (|o_i| * B) on masked tokens, 0 elsewhere.
    B, T = 3, 5
    logp = jnp.log(jnp.linspace(0.1, 0.9, B * T).reshape(B, T))
    A = jnp.asarray([1.5, -0.5, 0.25])
    lengths = [5, 2, 4]
    mask = jnp.asarray([[t < n for t in range(T)] for n in lengths])
    f = lambda lp: policy_loss(lp, None, None, A, mask, None, beta=0.0, loss_type="grpo", max_completion_length=T)[0]
    grad = np.asarray(jax.grad(f)(logp))
    want = np.zeros((B, T))
    for i, n in enumerate(lengths):
        want[i, :n] = -float(A[i]) / (n * B)
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-8)
    # and explicit old_logp == logp gives the same gradient
    g2 = np.asarray(jax.grad(lambda lp: policy_loss(lp, jax.lax.stop_gradient(lp), None, A, mask, None, beta=0.0,
                                                     max_completion_length=T)[0])(logp))
    np.testing.assert_allclose(g2, want, rtol=1e-6, atol=1e-8)


def test_policy_loss_jits():
    logp, old, ref, A, cmask, gmask = _random_batch(seed=2)
    fn = jax.jit(lambda *a: policy_loss(*a, loss_type="grpo", beta=0.04, guidance_loss="importance",
                                        max_completion_length=8))
    args = [jnp.asarray(x) for x in (logp, old, ref, A, cmask, gmask)]
    loss, metrics = fn(*args)
    eager, _ = policy_loss(*args, loss_type="grpo", beta=0.04, guidance_loss="importance", max_completion_length=8)
    np.testing.assert_allclose(float(loss), float(eager), rtol=1e-6)
    assert set(metrics) == {"kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss_type="ppo"), "loss_type.*grpo.*bnpo.*dr_grpo.*dapo"),
        (dict(kl_estimator="k2"), "kl_estimator.*k1.*k3.*low_var"),
        (dict(guidance_loss="drop"), "guidance_loss.*train.*mask.*importance"),
    ],
)
def test_invalid_names_raise(kwargs, match):
    x = jnp.zeros((2, 3))
    m = jnp.ones((2, 3), bool)
    with pytest.raises(ValueError, match=match):
        policy_loss(x, x, x, jnp.zeros(2), m, None, max_completion_length=3, **kwargs)


def test_beta_without_ref_raises():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(x, x, None, jnp.zeros(1), jnp.ones((1, 2)), None, beta=0.04, max_completion_length=2)
