"""Guidance-length controller and schedules (SPEC section 5), as pure functions on a pytree.

`GuidanceState` is carried inside the jitted train step; `update_guidance(state, r_k, cfg)` is called
once per optimizer step with that step's mean accuracy `r_k` and returns the state whose `length`
applies from the NEXT optimizer step. `cfg` is static (hashable frozen dataclass): only its strings
and numbers select the code path; every traced value goes through `jnp.where` / `lax` ops, so one
compile serves every guidance length.

Schedules (`cfg.schedule`), with k = number of optimizer steps completed after the update (k >= 1):

- ``fixed``: ``L = initial_length`` forever.
- ``linear_decay``: ``L_k = max(0, round(L_max * (1 - k / (total_steps - 1))))`` (the paper's
  rule-based baseline decays to 0: step ``k`` of ``0 .. total_steps - 1`` uses ``L_k``, so the last step
  of training uses 0; past it L stays 0). The initial state has ``L_0 = L_max``.
- ``cosine``: ``L_k = round(L_max * 0.5 * (1 + cos(pi * min(k, n) / n)))`` with ``n = total_steps - 1``
  (UFT-style annealing to 0 at the last step, stays 0 after). The initial state has ``L_0 = L_max``.
  (Both use ``n = 1`` when ``total_steps`` is 1.)
- ``adaptive`` with ``rule="paper"``: with ``m = min(T, k - 1)`` previous rewards,
  ``L = clip(floor(L * mean(previous m rewards) / r_k), L_min, L_max)`` when ``m >= 1``, ``r_k > 0``
  and the mean ``> 0``; otherwise unchanged. Then ``r_k`` is pushed into the ring buffer.
- ``adaptive`` with ``rule="reference"`` (the public code): cycles of 3 optimizer steps. The first
  two steps of a cycle only record their rewards; the third compares its reward ``r`` with the mean
  ``m`` of the two and, only when ``r > 0`` and ``m > 0``: ``r < m`` -> ``L = int(min(L*m/r, L_max))``;
  ``r > m`` -> ``L = max(int(L*m/r), 1)`` (the public code hard-codes 1, not ``L_min``); equal ->
  unchanged. The third reward is not reused. Updates happen after steps 3, 6, 9, ... Here ``count``
  is the per-cycle counter (0, 1, 2) and only ``history[0:2]`` is used.

Rounding conventions:
- ``round`` is ``jnp.round``: round half to even (the same as Python's ``round``).
- ``floor`` / ``int`` of the ratio ``x = L * mean / r``: the reference evaluates it in float64 Python;
  we compute in float32 (the state lives on device, x64 is off), where an exact-integer ratio such as
  ``64 * 0.2 / 0.4`` can come out as ``31.999998``. We floor ``x * (1 + 1e-6)`` (`_FLOOR_REL_TOL`,
  about 8 float32 ulps, above the ~3 ulps of error of the three roundings), so exact-integer ratios
  land on the intended integer. Two deliberate differences from the float64 reference follow:
  (a) where float64 itself lands just below an exact integer (``64 * ((0.3 + 0.35) / 2) / 0.4`` is
  ``51.99999999999999`` in Python, so the public code gives 51) we give the intended 52; (b) a true
  ratio within a relative 1e-6 below an integer (e.g. 2999.998 with L near 3000) floors up here.

Extensions beyond the paper (SPEC section 6), each off by default:

- ``ratio_schedule="adaptive"``: the guidance ratio ``alpha`` follows the same feedback as the
  ``paper`` length rule, ``alpha = clip(alpha * mean(previous m rewards) / r_k, min_ratio, max_ratio)``
  under the same conditions (``m >= 1``, ``r_k > 0``, mean ``> 0``), over the same ring buffer. Rising
  reward guides fewer rows, falling reward more. Not combinable with ``rule="reference"``, whose
  buffer holds cycles, not a ring of past steps.
- ``per_prompt=True``: a table ``prompt_failed`` (bool, one entry per training example) records whether
  the unguided rollouts of that example's group all failed (accuracy <= 0) the last time it was drawn;
  only groups whose entry is True get guided rows. An example never drawn counts as failed, so a first
  pass over the data is guided exactly as without the table (the prior suited to a weak model), and
  guidance is then withdrawn only where the model showed it can solve the prompt alone.
  ``record_outcomes`` writes the table from each step's rewards.

Prefix length per guided row (``length_mode``; SPEC section 9, the related guidance methods):

- ``tokens`` (default, G²RPO-A): every guided row gets ``min(L, trace length)``, ``L = state.length``.
- ``fraction`` (QuestA): a guided row gets ``floor(f(t) * trace length)`` of its own trace.
- ``binomial`` (UFT): a guided row gets a draw of ``Binomial(trace length, f(t))``, one per row, from
  the rollout's PRNG key (the state's ``rng``, which is seeded and checkpointed, so a run is
  deterministic given its seed and resumes exactly) with a salt folded in, so the draw shares no key
  with the sampler.
- ``ladder`` (StepHint): guided row ``j`` (0-based) of the ``k`` guided rows of a group gets
  ``floor(f(t) * (j + 1) / (k + 1) * trace length)``: one group spans short to long hints (k = 3:
  1/4, 2/4, 3/4 of the trace). StepHint cuts its traces at reasoning-step boundaries; the ladder is a
  fraction of the tokens instead, which needs no per-task step markup (on the embedded task a step is
  6 tokens, so a level can end inside a step).

``f(t)``, the fraction at 0-based step ``t`` (= ``state.step``, the optimizer steps completed), follows
``schedule`` from ``start_fraction`` to ``end_fraction`` with ``n = total_steps - 1`` (1 when total_steps
is 1): ``fixed``: ``f = start_fraction``; ``linear_decay``: ``f = start * s + end * (1 - s)`` with
``s = 1 - min(t, n) / n``; ``cosine``: the same with ``s = 0.5 * (1 + cos(pi * min(t, n) / n))``. So
step 0 uses ``start_fraction`` exactly and the last step, and any after it, ``end_fraction``. (UFT
writes its schedule with ``(t + 1) / T_hint`` and a floor ``p_low`` before dropping to 0 after
``T_hint``; here the cosine reaches ``end_fraction`` on the last step, as the token ``cosine`` does.)
``adaptive`` adapts a token length and is refused with the other modes. In the fraction modes
``state.length`` holds ``floor(f(t) * max_length)``, the prefix a ``max_length``-token trace would get,
so the logged ``guidance/length`` still shows the schedule; ``initial_length`` / ``min_length`` are unused.
Each floor goes through the same float32 guard as the controller's (``_floor_ratio``).
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp

SCHEDULES = ("fixed", "linear_decay", "cosine", "adaptive")
RULES = ("paper", "reference")
RATIO_SCHEDULES = ("fixed", "adaptive")
LENGTH_MODES = ("tokens", "fraction", "binomial", "ladder")
# Schedules a fraction (length_mode other than tokens) can follow.
FRACTION_SCHEDULES = ("fixed", "linear_decay", "cosine")
# Which rows of a group are guided and how (`guidance.guided_rows`; g2rpo_jax/guided_rows.py has the
# pieces): prefix = G²RPO-A's; second_pass = BREAD / Guide-GRPO; off_policy = LUFFY.
GUIDED_ROWS = ("prefix", "second_pass", "off_policy")

# Relative tolerance for float32 floor of L * mean / r (see module docstring).
_FLOOR_REL_TOL = 1e-6
# Cycle length of the reference rule: two recording steps then one comparing step.
_REFERENCE_CYCLE = 3
# Folded into the rollout's key (the state's rng, before the rollout splits it) for the binomial prefix
# draw, so the draw shares no key with the sampler, which uses the keys split from that rng.
_LENGTH_KEY_SALT = 0x4C454E


@flax.struct.dataclass
class GuidanceState:
    """Controller state; a pytree of scalars and one small buffer.

    length:  int32 scalar, current guidance length L (tokens of the trace prefilled into guided rows).
    ratio:   float32 scalar, current guidance ratio alpha.
    history: float32 [T], ring buffer of past step rewards (slot ``i % T`` holds the i-th reward,
             0-based; for ``rule="reference"`` slots 0 and 1 hold the current cycle's two rewards).
    count:   int32 scalar, rewards recorded so far (``reference``: position inside the cycle, 0..2).
    step:    int32 scalar, optimizer steps completed.
    prompt_failed: bool [num_examples] with ``per_prompt`` (see module docstring), else bool [1]
             (unused; a fixed shape keeps checkpoints and the compiled step uniform).
    """

    length: jax.Array
    ratio: jax.Array
    history: jax.Array
    count: jax.Array
    step: jax.Array
    prompt_failed: jax.Array


@dataclasses.dataclass(frozen=True)
class GuidanceConfig:
    """The YAML section ``guidance``."""

    schedule: str = "adaptive"  # fixed | linear_decay | cosine | adaptive
    rule: str = "paper"  # paper | reference (only for adaptive)
    ratio: float = 0.25  # alpha; 0 => vanilla GRPO (no guided rows)
    # prefix: the first k = round(alpha * G) rows of every group get the first L trace tokens and
    # continue on-policy. second_pass (BREAD / Guide-GRPO): all G rows are generated unguided first;
    # a group whose rows all failed is generated again with those k rows guided (L tokens), and they
    # replace its first k rows. off_policy (LUFFY): the k rows are the whole trace + EOS, no
    # continuation (L unused).
    guided_rows: str = "prefix"
    initial_length: int = 64  # L_0
    min_length: int = 1  # L_min
    max_length: int = 64  # L_max
    history_size: int = 2  # T
    total_steps: int = 0  # linear_decay / cosine horizon; 0 = train.max_steps (the caller fills it)
    # SPEC section 6 extensions (module docstring)
    ratio_schedule: str = "fixed"  # fixed | adaptive
    min_ratio: float = 0.0
    max_ratio: float = 1.0
    per_prompt: bool = False  # guide only groups whose unguided rollouts all failed last time
    # SPEC section 9 (module docstring): how a guided row's prefix length is chosen, and the fraction
    # schedule f(t) of the fraction modes (start_fraction at step 0 -> end_fraction at the last step)
    length_mode: str = "tokens"  # tokens | fraction (QuestA) | binomial (UFT) | ladder (StepHint)
    start_fraction: float = 1.0
    end_fraction: float = 0.0

    def validate(self) -> None:
        """Raise ValueError with one message naming the field and its valid values."""

        def _is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.schedule not in SCHEDULES:
            raise ValueError(f"guidance.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if self.rule not in RULES:
            raise ValueError(f"guidance.rule must be one of {list(RULES)}, got {self.rule!r}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"guidance.ratio must be a number in [0, 1] (0 = vanilla GRPO), got {self.ratio!r}")
        for name in ("initial_length", "min_length", "max_length", "history_size", "total_steps"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"guidance.{name} must be an integer, got {getattr(self, name)!r}")
        if self.min_length < 0:
            raise ValueError(f"guidance.min_length must be >= 0, got {self.min_length}")
        if self.max_length < self.min_length:
            raise ValueError(
                f"guidance.max_length ({self.max_length}) must be >= guidance.min_length ({self.min_length})"
            )
        if not self.min_length <= self.initial_length <= self.max_length:
            raise ValueError(
                f"guidance.initial_length ({self.initial_length}) must lie in "
                f"[guidance.min_length, guidance.max_length] = [{self.min_length}, {self.max_length}]"
            )
        if self.history_size < 2:
            raise ValueError(f"guidance.history_size must be >= 2, got {self.history_size}")
        if self.total_steps < 0:
            raise ValueError(
                f"guidance.total_steps must be >= 0 (0 = use train.max_steps), got {self.total_steps}"
            )
        if self.ratio_schedule not in RATIO_SCHEDULES:
            raise ValueError(
                f"guidance.ratio_schedule must be one of {list(RATIO_SCHEDULES)}, got {self.ratio_schedule!r}"
            )
        for name in ("min_ratio", "max_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"guidance.{name} must be a number in [0, 1], got {v!r}")
        if self.ratio_schedule == "adaptive":
            if not self.min_ratio <= self.ratio <= self.max_ratio:
                raise ValueError(
                    f"guidance.ratio ({self.ratio}) must lie in [guidance.min_ratio, guidance.max_ratio] = "
                    f"[{self.min_ratio}, {self.max_ratio}] when guidance.ratio_schedule is adaptive"
                )
            if self.schedule == "adaptive" and self.rule == "reference":
                raise ValueError(
                    "guidance.ratio_schedule=adaptive needs the ring buffer of past rewards, which "
                    "guidance.rule=reference does not keep; use guidance.rule=paper"
                )
        if not isinstance(self.per_prompt, bool):
            raise ValueError(f"guidance.per_prompt must be true or false, got {self.per_prompt!r}")
        self._validate_length_mode()
        self._validate_guided_rows()

    def _validate_length_mode(self) -> None:
        if self.length_mode not in LENGTH_MODES:
            raise ValueError(f"guidance.length_mode must be one of {list(LENGTH_MODES)}, got {self.length_mode!r}")
        for name in ("start_fraction", "end_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"guidance.{name} must be a number in [0, 1] (a fraction of each trace), got {v!r}")
        if self.length_mode != "tokens" and self.schedule not in FRACTION_SCHEDULES:
            raise ValueError(
                f"guidance.length_mode={self.length_mode} takes its fraction from guidance.schedule, one of "
                f"{list(FRACTION_SCHEDULES)} (guidance.start_fraction -> guidance.end_fraction), got "
                f"{self.schedule!r}; the adaptive controller adapts a token length: use guidance.length_mode=tokens"
            )

    def _validate_guided_rows(self) -> None:
        if self.guided_rows not in GUIDED_ROWS:
            raise ValueError(f"guidance.guided_rows must be one of {list(GUIDED_ROWS)}, got {self.guided_rows!r}")
        if self.guided_rows != "prefix" and self.ratio == 0:
            raise ValueError(f"guidance.guided_rows={self.guided_rows} guides round(guidance.ratio * G) rows of a "
                             "group; guidance.ratio=0 guides none (set guidance.ratio > 0)")
        if self.guided_rows == "second_pass" and self.per_prompt:
            raise ValueError("guidance.per_prompt guides the groups that failed the last time their prompt was "
                             "drawn, guidance.guided_rows=second_pass those that fail in this step: use one of them")


def init_guidance_state(cfg: GuidanceConfig, num_examples: int = 1) -> GuidanceState:
    """Initial state: L = initial_length (fixed, adaptive) or max_length (linear_decay, cosine).

    ``num_examples`` sizes the per-prompt table (``per_prompt``); every entry starts as failed."""
    cfg.validate()
    if cfg.per_prompt and num_examples < 1:
        raise ValueError(f"guidance.per_prompt needs a non-empty training set, got {num_examples} examples")
    length0 = cfg.max_length if cfg.schedule in ("linear_decay", "cosine") else cfg.initial_length
    if cfg.length_mode != "tokens":  # f(0) = start_fraction under every fraction schedule
        length0 = _nominal_length(jnp.asarray(cfg.start_fraction, jnp.float32), cfg)
    return GuidanceState(
        length=jnp.asarray(length0, jnp.int32),
        ratio=jnp.asarray(cfg.ratio, jnp.float32),
        history=jnp.zeros((cfg.history_size,), jnp.float32),
        count=jnp.asarray(0, jnp.int32),
        step=jnp.asarray(0, jnp.int32),
        prompt_failed=jnp.ones((num_examples if cfg.per_prompt else 1,), jnp.bool_),
    )


def _floor_ratio(x: jax.Array) -> jax.Array:
    """floor(x) robust to float32 rounding of exact-integer ratios (x >= 0)."""
    return jnp.floor(x * (1.0 + _FLOOR_REL_TOL))


def _push(history: jax.Array, count: jax.Array, reward: jax.Array) -> jax.Array:
    return history.at[count % history.shape[0]].set(reward)


def _trend(state: GuidanceState, r: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(do, mean of the previous m rewards, r_k or 1 where the rule does not apply): the paper rule
    scales by mean / r_k when ``do``. Kept apart, not as one factor, so ``x * mean / r`` rounds as
    the reference's Python expression does."""
    T = state.history.shape[0]
    m = jnp.minimum(state.count, T)  # = min(T, k - 1) when one reward is recorded per step
    # While count < T the valid entries are slots 0..count-1; afterwards every slot is valid.
    valid = jnp.arange(T) < m
    mean_prev = jnp.sum(jnp.where(valid, state.history, 0.0)) / jnp.maximum(m, 1).astype(jnp.float32)
    do = (m >= 1) & (r > 0) & (mean_prev > 0)
    return do, mean_prev, jnp.where(do, r, 1.0)


def _update_paper(state: GuidanceState, r: jax.Array, cfg: GuidanceConfig) -> GuidanceState:
    do, mean_prev, safe_r = _trend(state, r)
    proposed = _floor_ratio(state.length.astype(jnp.float32) * mean_prev / safe_r)
    proposed = jnp.clip(proposed, cfg.min_length, cfg.max_length).astype(jnp.int32)  # clip in float: no overflow
    length = jnp.where(do, proposed, state.length)
    return state.replace(
        length=length,
        history=_push(state.history, state.count, r),
        count=state.count + 1,
        step=state.step + 1,
    )


def _update_reference(state: GuidanceState, r: jax.Array, cfg: GuidanceConfig) -> GuidanceState:
    compare = state.count >= _REFERENCE_CYCLE - 1  # third step of the cycle
    m = 0.5 * (state.history[0] + state.history[1])
    do = compare & (r > 0) & (m > 0)
    safe_r = jnp.where(do, r, 1.0)
    Lf = state.length.astype(jnp.float32)
    x = Lf * m / safe_r
    up = jnp.minimum(_floor_ratio(jnp.minimum(x, float(cfg.max_length))), float(cfg.max_length))  # int(min(x, L_max))
    down = jnp.maximum(_floor_ratio(x), 1.0)  # max(int(x), 1)
    new = jnp.where(r < m, up, jnp.where(r > m, down, Lf)).astype(jnp.int32)
    length = jnp.where(do, new, state.length)
    # Recording steps write slot `count`; the comparing step writes nothing and restarts the cycle.
    slot = jnp.minimum(state.count, 1)
    history = jnp.where(compare, state.history, state.history.at[slot].set(r))
    count = jnp.where(compare, 0, state.count + 1).astype(jnp.int32)
    return state.replace(length=length, history=history, count=count, step=state.step + 1)


def _require_total_steps(cfg: GuidanceConfig) -> int:
    if cfg.total_steps <= 0:
        raise ValueError(
            f"guidance.schedule={cfg.schedule!r} needs guidance.total_steps > 0; set it, or let the trainer "
            "fill it from train.max_steps (guidance.total_steps: 0 means 'use train.max_steps')"
        )
    return cfg.total_steps


def update_guidance(state: GuidanceState, reward, cfg: GuidanceConfig) -> GuidanceState:
    """Advance the controller by one optimizer step with that step's mean accuracy ``reward``.

    jit-able with ``cfg`` static (``jax.jit(update_guidance, static_argnames="cfg")``). The returned
    ``length`` is the one to use from the next optimizer step on. Every schedule records ``reward``
    (``fixed`` / ``linear_decay`` / ``cosine`` / ``paper``: ring buffer; ``reference``: cycle slots).
    """
    cfg.validate()  # at trace time: cfg is static
    r = jnp.asarray(reward, jnp.float32)
    new = _update_length(state, r, cfg)
    if cfg.ratio_schedule == "adaptive":
        do, mean_prev, safe_r = _trend(state, r)  # the buffer before this step's reward was pushed
        alpha = jnp.clip(state.ratio * mean_prev / safe_r, cfg.min_ratio, cfg.max_ratio)
        new = new.replace(ratio=jnp.where(do, alpha, state.ratio).astype(jnp.float32))
    return new


def _update_length(state: GuidanceState, r: jax.Array, cfg: GuidanceConfig) -> GuidanceState:
    if cfg.schedule == "adaptive":
        if cfg.rule == "paper":
            return _update_paper(state, r, cfg)
        return _update_reference(state, r, cfg)

    k = state.step + 1
    recorded = state.replace(history=_push(state.history, state.count, r), count=state.count + 1, step=k)
    if cfg.length_mode != "tokens":
        return recorded.replace(length=_nominal_length(prefix_fraction(k, cfg), cfg))
    if cfg.schedule == "fixed":
        return recorded.replace(length=jnp.asarray(cfg.initial_length, jnp.int32))
    # the length after k updates serves step k (0-based): the last step, total_steps - 1, gets 0
    total = float(max(_require_total_steps(cfg) - 1, 1))
    kf = jnp.minimum(k.astype(jnp.float32), total)
    if cfg.schedule == "linear_decay":
        L = jnp.round(cfg.max_length * (1.0 - kf / total))
    else:  # cosine
        L = jnp.round(cfg.max_length * 0.5 * (1.0 + jnp.cos(jnp.pi * kf / total)))
    return recorded.replace(length=jnp.maximum(L, 0.0).astype(jnp.int32))


def prefix_fraction(step, cfg: GuidanceConfig) -> jax.Array:
    """``f(step)``, float32: the fraction of each trace a guided row gets at 0-based step ``step``
    (``length_mode`` fraction / binomial / ladder; module docstring). jit-able, ``cfg`` static."""
    if cfg.schedule == "fixed":
        return jnp.asarray(cfg.start_fraction, jnp.float32)
    total = float(max(_require_total_steps(cfg) - 1, 1))
    kf = jnp.minimum(jnp.asarray(step).astype(jnp.float32), total)
    if cfg.schedule == "linear_decay":
        s = 1.0 - kf / total
    else:  # cosine
        s = 0.5 * (1.0 + jnp.cos(jnp.pi * kf / total))
    # start * s + end * (1 - s): exactly start at s = 1 and exactly end at s = 0
    return (cfg.start_fraction * s + cfg.end_fraction * (1.0 - s)).astype(jnp.float32)


def _nominal_length(fraction: jax.Array, cfg: GuidanceConfig) -> jax.Array:
    """``state.length`` in the fraction modes: the prefix of a ``max_length``-token trace."""
    return _floor_ratio(fraction * float(cfg.max_length)).astype(jnp.int32)


def num_guided(ratio, num_generations: int) -> jax.Array:
    """Guided rows per group: ``k = clip(round(alpha * G), 0, G)`` as int32.

    ``jnp.round`` rounds half to even, like Python's ``round`` (alpha=0.25, G=10 -> 2.5 -> 2;
    alpha=0.25, G=8 -> 2; alpha=0.15, G=10 -> float32 1.5000001 -> 2). Chosen so that a Python
    reference ``round(alpha * G)`` agrees at exact halves; ``ratio`` may be traced (state.ratio).
    """
    k = jnp.round(jnp.asarray(ratio, jnp.float32) * num_generations)
    return jnp.clip(k, 0, num_generations).astype(jnp.int32)


def guide_lengths(state: GuidanceState, trace_lengths, num_generations: int, example_idx=None,
                  cfg: GuidanceConfig | None = None, key=None) -> jax.Array:
    """Per rollout row prefix length, int32 [B].

    ``trace_lengths``: int [B], the tokenized guidance-trace length of each row's prompt (rows of one
    group contiguous, B = num_prompts * G). Row i is guided when ``i % G < num_guided(state.ratio, G)``;
    with ``example_idx`` (int [B], each row's training-example index; pass it iff ``per_prompt``) only
    rows whose example's ``prompt_failed`` entry is True are. A guided row gets, by ``cfg.length_mode``
    (``cfg`` None: ``tokens``), ``min(L, trace_lengths[i])`` (no pad tokens: a short trace is used
    whole) or its share of its trace (`fraction_lengths`); an unguided row gets 0. ``key``: the
    rollout's PRNG key, needed by ``binomial`` only.
    """
    trace_lengths = jnp.asarray(trace_lengths, jnp.int32)
    B = trace_lengths.shape[0]
    if B % num_generations != 0:
        raise ValueError(f"trace_lengths has {B} rows, not a multiple of num_generations={num_generations}")
    k = num_guided(state.ratio, num_generations)
    slot = jnp.arange(B) % num_generations
    guided = slot < k
    if example_idx is not None:
        guided = guided & state.prompt_failed[jnp.asarray(example_idx, jnp.int32)]
    traces = jnp.maximum(trace_lengths, 0)
    if cfg is None or cfg.length_mode == "tokens":
        lengths = jnp.minimum(jnp.maximum(state.length, 0), traces)
    else:
        lengths = fraction_lengths(prefix_fraction(state.step, cfg), traces, slot, k, cfg.length_mode, key)
    return jnp.where(guided, lengths, 0).astype(jnp.int32)


def fraction_lengths(fraction, trace_lengths, slot, k, mode: str, key=None) -> jax.Array:
    """Each row's prefix in a fraction mode, int32 [B] in ``[0, trace_lengths]`` (as if every row were
    guided; `guide_lengths` zeroes the unguided ones). ``fraction``: f(t); ``slot``: each row's index
    in its group; ``k``: guided rows per group (``ladder``: row ``slot`` is level ``slot + 1`` of
    ``k + 1``); ``key``: ``binomial``'s PRNG key (the salt is folded in here)."""
    n = jnp.asarray(trace_lengths, jnp.int32)
    f = jnp.clip(jnp.asarray(fraction, jnp.float32), 0.0, 1.0)
    nf = n.astype(jnp.float32)
    if mode == "fraction":
        out = _floor_ratio(f * nf)
    elif mode == "ladder":
        level = (slot + 1).astype(jnp.float32) / (jnp.asarray(k).astype(jnp.float32) + 1.0)
        out = _floor_ratio(f * level * nf)
    elif mode == "binomial":
        if key is None:
            raise ValueError("guidance.length_mode=binomial draws each prefix length at random: pass the rollout's key")
        out = jax.random.binomial(jax.random.fold_in(key, _LENGTH_KEY_SALT), nf, jnp.broadcast_to(f, nf.shape))
    else:
        raise ValueError(f"no fraction rule for guidance.length_mode={mode!r}; one of {list(LENGTH_MODES[1:])}")
    return jnp.clip(out, 0.0, nf).astype(jnp.int32)


def record_outcomes(state: GuidanceState, example_idx, correct, guide_len, num_generations: int) -> GuidanceState:
    """Per-prompt table update (``per_prompt``): for each group of G rows (one training example,
    ``example_idx`` int [B]), set ``prompt_failed`` to whether all its unguided rows (``guide_len == 0``)
    have ``correct <= 0``. A group with no unguided row leaves its entry unchanged. jit-able."""
    example_idx = jnp.asarray(example_idx, jnp.int32).reshape(-1, num_generations)
    unguided = (jnp.asarray(guide_len) == 0).reshape(-1, num_generations)
    solved = (jnp.asarray(correct, jnp.float32) > 0).reshape(-1, num_generations)
    any_unguided = unguided.any(axis=1)
    all_failed = ~(solved & unguided).any(axis=1)
    idx = example_idx[:, 0]
    current = state.prompt_failed[idx]
    return state.replace(prompt_failed=state.prompt_failed.at[idx].set(jnp.where(any_unguided, all_failed, current)))
