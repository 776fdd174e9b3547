import subprocess
import sys
from pathlib import Path

import pytest

from g2rpo_jax.config import SECTIONS, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.yaml")


def test_issue_override_line_applies_with_exact_names():
    cfg = load_config(DEFAULT, ["train.max_steps=20", "train.output_dir=runs/demo", "train.seed=1",
                                "guidance.schedule=adaptive", "guidance.ratio=0.25", "rollout.num_generations=8"])
    assert cfg.train.max_steps == 20 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.output_dir == "runs/demo"
    assert cfg.train.seed == 1
    assert cfg.guidance.schedule == "adaptive"
    assert cfg.guidance.ratio == 0.25 and isinstance(cfg.guidance.ratio, float)
    assert cfg.rollout.num_generations == 8


def test_required_sections_exist():
    for name in ("model", "data", "rollout", "guidance", "loss", "optim", "train", "eval", "checkpoint", "mesh"):
        assert name in SECTIONS


def test_yaml_values_then_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  beta: 0.1\n  loss_type: dapo\n")
    cfg = load_config(str(path), ["loss.beta=0.0", "loss.beta=0.5"])
    assert cfg.loss.beta == 0.5
    assert cfg.loss.loss_type == "dapo"
    # untouched values keep their defaults
    assert cfg.loss.epsilon == 0.2


def test_type_coercion_int_to_float_and_null_and_lists():
    cfg = load_config(None, ["optim.learning_rate=1", "loss.epsilon_high=null", "loss.epsilon_high=0.28",
                             "reward.reward_funcs=[accuracy,format]", "reward.reward_weights=[1.0,0.1]",
                             "warm_start.enabled=false"])
    assert cfg.optim.learning_rate == 1.0 and isinstance(cfg.optim.learning_rate, float)
    assert cfg.loss.epsilon_high == 0.28
    assert cfg.reward.reward_funcs == ["accuracy", "format"]
    assert cfg.reward.reward_weights == [1.0, 0.1]
    assert cfg.warm_start.enabled is False


@pytest.mark.parametrize("override, fragment", [
    ("train.max_step=3", "unknown config key 'train.max_step'"),
    ("trian.max_steps=3", "unknown config section 'trian'"),
    ("train.max_steps=abc", "config key 'train.max_steps'"),
    ("loss.loss_type=ppo", "'grpo', 'bnpo', 'dr_grpo', 'dapo'"),
    ("guidance.schedule=exponential", "guidance.schedule"),
    ("rollout.num_generations=1", "rollout.num_generations"),
    ("train.max_steps", "section.key=value"),
    ("optim.gradient_accumulation_steps=7", "optim.gradient_accumulation_steps must divide the 64 rows"),
])
def test_bad_overrides_give_one_line_errors_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT, [override])
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_unknown_key_lists_valid_choices():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.max_step=3"])
    assert "max_steps" in str(info.value) and "output_dir" in str(info.value)


def test_missing_file_is_a_clear_error():
    with pytest.raises(ConfigError, match="not found"):
        load_config("no/such/file.yaml")


def test_cli_help_lists_sections_and_bad_key_exits_2():
    help_text = subprocess.run([sys.executable, "-m", "g2rpo_jax.train", "--help"], capture_output=True,
                               text=True, cwd=ROOT, check=True).stdout
    for name in SECTIONS:
        assert f"  {name}:" in help_text
    bad = subprocess.run([sys.executable, "-m", "g2rpo_jax.train", "--config", DEFAULT, "train.max_step=1"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: unknown config key 'train.max_step'; valid keys in 'train': "
                                               "max_steps, seed, output_dir, progress, log_every, resume, "
                                               "log_completions_every"]


def test_config_differences_lists_changed_dotted_keys_with_both_values():
    from g2rpo_jax.config import config_differences, to_dict

    a = to_dict(load_config(None, ["loss.beta=0.0", "rollout.stop_strings=[x]"]))
    b = to_dict(load_config(None, ["train.progress=false", "rollout.stop_strings=[x]"]))
    assert config_differences(a, b) == [("loss.beta", 0.0, 0.04), ("train.progress", True, False)]
    assert config_differences(a, b, ignore=("train.progress",)) == [("loss.beta", 0.0, 0.04)]
    # JSON-normalised: a tuple equals a list; a key missing on one side differs from a value
    assert config_differences({"m": {"r": (1, 2)}}, {"m": {"r": [1, 2]}}) == []
    assert config_differences({"m": {}}, {"m": {"new": 1}}) == [("m.new", None, 1)]
