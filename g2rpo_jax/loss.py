"""GRPO-family loss pieces as small pure jnp functions (SPEC section 4).

Shapes: B = num_prompts * G rollout rows (rows of one group contiguous), T = completion positions.
All per-token arrays (`logp`, `old_logp`, `ref_logp`, masks) are [B, T] and aligned: position t holds
the log-prob of completion token t. `completion_mask` marks completion tokens (guidance prefix +
generated tokens up to and including the first EOS); `guidance_mask` marks the guidance-prefix tokens
(a subset of `completion_mask`). Masks may be bool or 0/1 floats.

Per token (before aggregation), with ``rho = exp(logp - old_logp)``:
``l_t = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t``.

Guidance tokens (`guidance_loss`, the registry `GUIDANCE_LOSSES`): the tokens of ``guidance_mask``
were not sampled from the policy (a teacher's trace, placed by the rollout), so each entry says which
weight replaces ``rho`` on them, and whether the KL term applies. ``pi = exp(logp)``, ``gamma`` =
``importance_gamma``; generated tokens always get the clipped ratio and the KL term.
- ``train`` (reference behaviour): they count like any completion token (``rho``, clipped, KL). With
  one update per batch rho = 1, so this is advantage-weighted SFT on the teacher tokens.
- ``mask``: removed from the mask (context only).
- ``importance`` (our extension, LUFFY-style policy shaping on the prefix): the clipped ratio term is
  replaced by ``-(pi / (pi + gamma)) * A`` (gradient ``-A * gamma / (pi + gamma)^2 * grad pi``, no
  clipping: the weight is already bounded in (0, 1)); the KL term still applies.
- ``luffy`` (LUFFY, arXiv 2504.14945, the published form; with ``guidance.guided_rows=off_policy``, where
  the guidance tokens are whole off-policy traces): the same shaped term ``-f(pi) * A`` with
  ``f(pi) = pi / (pi + gamma)``, unclipped, and NO KL term on those tokens. It differs from
  ``importance`` in exactly that: the k3 / k1 estimators estimate KL(pi || pi_ref) only on tokens
  sampled from pi, and LUFFY's objective has no KL term on off-policy tokens (its recipe has none at all:
  set ``beta=0`` to match it everywhere). The aggregation is the configured one: the paper divides by
  every token of the batch, on- and off-policy (``bnpo`` / ``dapo``); the released training scripts we
  read divide by the fixed response length instead (``dr_grpo``).
- ``guide`` (Guide-GRPO's off-policy correction, arXiv 2506.13923, for prefix guidance): the policy is
  optimised for the prompt without the hint. Here the hint is the prefix, which is part of the
  completion and already scored under the plain prompt; what the plain ratio gets wrong is the
  behaviour probability of a teacher token, which is 1 (placed, not sampled), not ``pi_old``. So on
  guidance tokens ``rho = pi / 1`` (not ``exp(logp - old_logp)``), clipped with the same epsilons, KL
  applied; continuation tokens keep their usual ratio (their behaviour policy saw the same context).
- ``sft`` (UFT, arXiv 2505.16984): guidance tokens get a log-likelihood (SFT) term instead of the
  policy-gradient and KL terms, ``l_t = -sft_coef * logp_t`` (teacher-forced: each hint token given the
  prompt and the hint before it); they stay in the mask, so the aggregation averages them with the
  generated tokens. UFT's objective weights the hint log-likelihood by its KL coefficient; here it
  has its own weight, ``sft_coef``.

Aggregation (`loss_type`) over the effective mask:
- ``grpo``: mean over each sequence's tokens, then mean over sequences that have at least one token
  (an empty sequence contributes nothing and is left out of the denominator).
- ``bnpo`` / ``dapo``: sum over all tokens / number of tokens. Within ONE batch both are the token
  mean; they differ only across gradient accumulation / processes (TRL: bnpo normalises each local
  micro-batch, dapo by the global token count). `loss_parts` returns numerator and denominator so a
  caller can implement either by summing the parts it wants before dividing.
- ``dr_grpo``: sum / (B * max_completion_length).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

# `low_var` clips the k3 estimate to this range (k3 >= 0, so in effect to [0, 10]): the clamp used by
# verl's "low_var_kl", which bounds the rare huge values when ref >> logp.
LOW_VAR_KL_CLIP = 10.0

# Registries: config values (`loss.loss_type`, `loss.kl_estimator`, `loss.scale_rewards`,
# `loss.guidance_loss`) are their keys, and config validation reads the keys from here, so a new
# entry needs no other edit.
LOSS_AGGREGATIONS: dict[str, Callable] = {}  # (masked per-token loss, mask, max_completion_length) -> (num, den)
KL_ESTIMATORS: dict[str, Callable] = {}  # (logp, ref_logp) float32 [B, T] -> per-token KL estimate
REWARD_SCALINGS: dict[str, Callable] = {}  # (group-centred rewards [n, G], rewards [n, G], eps) -> advantages
GUIDANCE_LOSSES: dict[str, "GuidanceTokens"] = {}  # how guidance tokens enter the loss (docstring above)


def _registrar(registry: dict, kind: str):
    def register(name: str):
        def add(fn):
            if name in registry:
                raise ValueError(f"{kind} {name!r} is registered twice")
            registry[name] = fn
            return fn

        return add

    return register


register_aggregation = _registrar(LOSS_AGGREGATIONS, "loss aggregation")
register_kl_estimator = _registrar(KL_ESTIMATORS, "KL estimator")
register_reward_scaling = _registrar(REWARD_SCALINGS, "reward scaling")
register_guidance_loss = _registrar(GUIDANCE_LOSSES, "guidance loss")


@dataclasses.dataclass(frozen=True)
class GuidanceTokens:
    """One `guidance_loss` entry: whether guidance tokens are in the loss, the weight that replaces the
    ratio on them (``ratio``: exp(logp - old_logp) as on any token; ``pi``: pi / 1, a teacher token's
    behaviour probability taken as 1, clipped; ``shaped``: pi / (pi + gamma), unclipped; ``sft``: no
    ratio, the log-likelihood ``-sft_coef * logp``) and whether the KL term applies on them."""

    in_loss: bool = True
    weight: str = "ratio"
    kl: bool = True


register_guidance_loss("train")(GuidanceTokens())
register_guidance_loss("mask")(GuidanceTokens(in_loss=False))
register_guidance_loss("importance")(GuidanceTokens(weight="shaped"))
register_guidance_loss("luffy")(GuidanceTokens(weight="shaped", kl=False))
register_guidance_loss("guide")(GuidanceTokens(weight="pi"))
register_guidance_loss("sft")(GuidanceTokens(weight="sft", kl=False))


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


@register_reward_scaling("group")
def _scale_by_group_std(centred, grouped, eps):
    if grouped.shape[1] < 2:
        raise ValueError("scale_rewards='group' needs num_generations >= 2 (std with ddof=1)")
    return centred / (grouped.std(axis=1, ddof=1, keepdims=True) + eps)


@register_reward_scaling("batch")
def _scale_by_batch_std(centred, grouped, eps):  # the centring stays per group, as TRL does
    return centred / (grouped.reshape(-1).std(ddof=1) + eps)


@register_reward_scaling("none")
def _no_scaling(centred, grouped, eps):
    return centred


def group_advantages(rewards, num_generations: int, scale_rewards: str = "group", eps: float = 1e-4):
    """Group-relative advantages, float32 [B].

    ``A_i = (R_i - mean_g) / (std + eps)``, mean over the group of row i (G contiguous rows), std with
    Bessel's correction (ddof=1): over the group (``group``), over the whole batch (``batch``; the
    centring stays per group, as TRL does), or no division at all (``none``: ``A_i = R_i - mean_g``).
    A group whose rewards are all equal gets zero advantages under every choice.
    """
    _check_choice("scale_rewards", scale_rewards, REWARD_SCALINGS)
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 1 or r.shape[0] % num_generations != 0:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by num_generations={num_generations}, got shape {r.shape}"
        )
    if scale_rewards != "none" and r.shape[0] < 2:
        raise ValueError("scale_rewards needs at least 2 rewards for a Bessel-corrected std")
    grouped = r.reshape(-1, num_generations)
    centred = grouped - grouped.mean(axis=1, keepdims=True)
    return REWARD_SCALINGS[scale_rewards](centred, grouped, eps).reshape(-1)


def kl_penalty(logp, ref_logp, estimator: str = "k3"):
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs.

    - ``k1``: ``logp - ref_logp`` (unbiased, high variance, can be negative).
    - ``k3``: ``exp(ref - logp) - (ref - logp) - 1`` (unbiased, always >= 0; the GRPO default).
    - ``low_var``: k3 clipped to ``[-10, 10]`` (`LOW_VAR_KL_CLIP`; since k3 >= 0 this caps it at 10).
    """
    _check_choice("kl_estimator", estimator, KL_ESTIMATORS)
    return KL_ESTIMATORS[estimator](jnp.asarray(logp, jnp.float32), jnp.asarray(ref_logp, jnp.float32))


@register_kl_estimator("k1")
def _kl_k1(logp, ref_logp):
    return logp - ref_logp


@register_kl_estimator("k3")
def _kl_k3(logp, ref_logp):
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


@register_kl_estimator("low_var")
def _kl_low_var(logp, ref_logp):
    return jnp.clip(_kl_k3(logp, ref_logp), -LOW_VAR_KL_CLIP, LOW_VAR_KL_CLIP)


def effective_mask(completion_mask, guidance_mask, guidance_loss: str = "train"):
    """float32 [B, T] mask of the tokens that enter the loss (``mask`` drops the guidance tokens)."""
    _check_choice("guidance_loss", guidance_loss, GUIDANCE_LOSSES)
    m = jnp.asarray(completion_mask).astype(jnp.float32)
    if not GUIDANCE_LOSSES[guidance_loss].in_loss and guidance_mask is not None:
        m = m * (1.0 - jnp.asarray(guidance_mask).astype(jnp.float32))
    return m


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The loss section as the loss functions take it (the config's ``epsilon`` is ``epsilon_low``;
    ``epsilon_high`` null is resolved to it)."""

    loss_type: str = "grpo"
    beta: float = 0.04
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    kl_estimator: str = "k3"
    guidance_loss: str = "train"
    importance_gamma: float = 0.1
    sft_coef: float = 1.0

    def as_kwargs(self) -> dict:
        """Keyword arguments of `loss_sums` / `policy_loss`."""
        return dataclasses.asdict(self)


def per_token_loss(
    logp,
    old_logp,
    ref_logp,
    advantages,
    completion_mask,
    guidance_mask,
    *,
    beta: float = 0.04,
    epsilon_low: float = 0.2,
    epsilon_high: Optional[float] = 0.2,
    kl_estimator: str = "k3",
    guidance_loss: str = "train",
    importance_gamma: float = 0.1,
    sft_coef: float = 1.0,
):
    """Unaggregated loss: returns ``(l [B, T], effective mask [B, T] float32, aux)``.

    ``aux`` holds per-token float32 arrays ``kl`` (only when ref_logp is given), ``is_low_clipped``,
    ``is_high_clipped``. Positions outside the mask are zeroed in the inputs first, so garbage (even
    -inf) log-probs at pads give neither NaN values nor NaN gradients. ``old_logp=None`` means one
    update per batch: ``old_logp = stop_gradient(logp)``. ``epsilon_high=None`` means epsilon_low.
    """
    _check_choice("guidance_loss", guidance_loss, GUIDANCE_LOSSES)
    _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    beta_is_zero = isinstance(beta, (int, float)) and beta == 0
    if ref_logp is None and not beta_is_zero:
        raise ValueError(f"ref_logp is required when beta != 0 (got beta={beta}); pass beta=0 to skip the KL term")
    if epsilon_high is None:
        epsilon_high = epsilon_low

    mask = effective_mask(completion_mask, guidance_mask, guidance_loss)
    cmask = jnp.asarray(completion_mask).astype(jnp.float32) > 0
    gmask = (
        jnp.zeros_like(cmask) if guidance_mask is None else (jnp.asarray(guidance_mask).astype(jnp.float32) > 0)
    )
    keep = cmask | gmask

    logp = jnp.where(keep, jnp.asarray(logp, jnp.float32), 0.0)
    if old_logp is None:
        old_logp = jax.lax.stop_gradient(logp)
    old_logp = jnp.where(keep, jnp.asarray(old_logp, jnp.float32), 0.0)

    A = jnp.asarray(advantages, jnp.float32)[:, None]
    spec = GUIDANCE_LOSSES[guidance_loss]
    rho = jnp.exp(logp - old_logp)
    if spec.weight == "pi":  # a teacher token's behaviour probability is 1: rho = pi / 1
        rho = jnp.where(gmask, jnp.exp(logp), rho)
    rho_clipped = jnp.clip(rho, 1.0 - epsilon_low, 1.0 + epsilon_high)
    loss = -jnp.minimum(rho * A, rho_clipped * A)
    is_low = ((rho < 1.0 - epsilon_low) & (A < 0)).astype(jnp.float32)
    is_high = ((rho > 1.0 + epsilon_high) & (A > 0)).astype(jnp.float32)

    if spec.weight == "shaped":
        loss, is_low, is_high = _shaped_guidance_terms(logp, A, gmask, loss, is_low, is_high, importance_gamma)

    aux = {"is_low_clipped": is_low, "is_high_clipped": is_high}
    if ref_logp is not None:
        ref = jnp.where(keep, jnp.asarray(ref_logp, jnp.float32), 0.0)
        kl = kl_penalty(logp, ref, kl_estimator)
        aux["kl"] = kl  # the metric: over every token of the loss, also where the loss leaves it out
        if not beta_is_zero:
            loss = loss + beta * (kl if spec.kl else jnp.where(gmask, 0.0, kl))
    if spec.weight == "sft":  # after the KL term: it replaces that too on guidance tokens
        loss = jnp.where(gmask, -sft_coef * logp, loss)
        aux["is_low_clipped"] = jnp.where(gmask, 0.0, is_low)
        aux["is_high_clipped"] = jnp.where(gmask, 0.0, is_high)
    loss = jnp.where(mask > 0, loss, 0.0)
    return loss, mask, aux


def _shaped_guidance_terms(logp, A, gmask, loss, is_low, is_high, gamma):
    """LUFFY's policy shaping on guidance tokens: ``-(pi / (pi + gamma)) * A`` replaces the clipped
    term there; no clipping happens on them, so they never count as clipped."""
    pi = jnp.exp(logp)
    shaped = -(pi / (pi + gamma)) * A
    return jnp.where(gmask, shaped, loss), jnp.where(gmask, 0.0, is_low), jnp.where(gmask, 0.0, is_high)


def loss_parts(per_token, mask, loss_type: str = "grpo", max_completion_length: Optional[int] = None):
    """(numerator, denominator) with loss = numerator / max(denominator, 1)  [dr_grpo: exact denominator].

    grpo: (sum of per-sequence means, number of non-empty sequences); bnpo / dapo: (token sum, token
    count); dr_grpo: (token sum, B * max_completion_length). Summing parts over micro-batches before
    dividing gives the global-batch versions (dapo's token mean, grpo's sequence mean).
    """
    _check_choice("loss_type", loss_type, LOSS_AGGREGATIONS)
    m = jnp.asarray(mask).astype(jnp.float32)
    masked = jnp.where(m > 0, per_token * m, 0.0)
    return LOSS_AGGREGATIONS[loss_type](masked, m, max_completion_length)


@register_aggregation("grpo")
def _sequence_mean(masked, m, max_completion_length):
    n_tok = jnp.sum(m, axis=-1)
    seq = jnp.sum(masked, axis=-1) / jnp.maximum(n_tok, 1.0)
    return jnp.sum(seq), jnp.sum((n_tok > 0).astype(jnp.float32))


@register_aggregation("bnpo")
def _token_mean(masked, m, max_completion_length):
    return jnp.sum(masked), jnp.sum(m)


@register_aggregation("dr_grpo")
def _constant_length(masked, m, max_completion_length):
    L = masked.shape[-1] if max_completion_length is None else max_completion_length
    return jnp.sum(masked), jnp.asarray(masked.shape[0] * L, jnp.float32)


register_aggregation("dapo")(_token_mean)  # the same parts; dapo differs from bnpo only across micro-batches


def loss_sums(
    logp,
    old_logp,
    ref_logp,
    advantages,
    completion_mask,
    guidance_mask,
    *,
    loss_type: str = "grpo",
    max_completion_length: Optional[int],
    entropy=None,
    **token_loss_kwargs,
):
    """The additive pieces of :func:`policy_loss`: ``loss_numerator`` / ``loss_denominator``
    (`loss_parts`), ``tokens`` (the effective mask's count) and the masked sums of the metrics
    (``entropy`` [B, T] too, when given). Summed over micro-batches they are the whole batch's;
    :func:`loss_metrics` turns them into means."""
    _check_choice("loss_type", loss_type, LOSS_AGGREGATIONS)
    per_tok, mask, aux = per_token_loss(logp, old_logp, ref_logp, advantages, completion_mask, guidance_mask,
                                        **token_loss_kwargs)
    num, den = loss_parts(per_tok, mask, loss_type, max_completion_length)

    def masked_sum(values):
        return jnp.sum(jnp.where(mask > 0, values * mask, 0.0))

    low, high = aux["is_low_clipped"], aux["is_high_clipped"]
    sums = {"loss_numerator": num, "loss_denominator": den, "tokens": jnp.sum(mask),
            "clip_ratio/low_mean": masked_sum(low), "clip_ratio/high_mean": masked_sum(high),
            "clip_ratio/region_mean": masked_sum(jnp.maximum(low, high))}
    if "kl" in aux:
        sums["kl"] = masked_sum(aux["kl"])
    if entropy is not None:
        sums["entropy"] = masked_sum(jnp.where(mask > 0, jax.lax.stop_gradient(entropy), 0.0))
    return sums


def loss_metrics(sums: dict) -> dict:
    """Token means over the effective mask (TRL names) from :func:`loss_sums`' masked sums."""
    tokens = jnp.maximum(sums["tokens"], 1.0)
    return {name: value / tokens for name, value in sums.items()
            if name not in ("loss_numerator", "loss_denominator", "tokens")}


def policy_loss(*arrays, **settings):
    """GRPO-family loss over one batch: ``(loss, metrics)``; the arguments are :func:`loss_sums`'
    (logp, old_logp, ref_logp, advantages, completion_mask, guidance_mask; loss_type,
    max_completion_length and :func:`per_token_loss`'s settings).

    ``max_completion_length`` is the dr_grpo normaliser (required keyword; ``None`` means T, the
    width of the arrays). ``ref_logp`` may be None when beta == 0. ``old_logp`` may be None (one
    update per batch: stop_gradient(logp)). Metrics (TRL names, token means over the effective mask):
    ``kl`` (when ref_logp is given, even with beta == 0), ``clip_ratio/low_mean`` (rho < 1 - eps_low
    with A < 0), ``clip_ratio/high_mean`` (rho > 1 + eps_high with A > 0), ``clip_ratio/region_mean``
    (either).
    """
    sums = loss_sums(*arrays, **settings)
    return sums["loss_numerator"] / jnp.maximum(sums["loss_denominator"], 1.0), loss_metrics(sums)
