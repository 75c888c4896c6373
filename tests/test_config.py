import re

import pytest

from tether.config import PPOParams, RunConfig, build_config
from tether.fields import field_docs, flat_keys, help_text
from tether.errors import TetherError


def test_defaults_finalize():
    config = build_config()
    assert config.ppo.clip_range == 0.2
    assert config.model.value_model == "head"


def test_dotted_overrides_are_typed():
    config = build_config(
        overrides=[
            "ppo.clip_range=0.1",
            "ppo.adaptive_kl=true",
            "ppo.steps=7",
            "ppo.value_clip_range=none",
            "sampling.top_p=0.9",
        ]
    )
    assert config.ppo.clip_range == 0.1 and config.ppo.kl_control == "adaptive" and config.ppo.steps == 7
    assert config.ppo.value_clip_range is None and config.sampling.top_p == 0.9


def test_override_text_that_is_not_yaml_stays_a_string():
    config = build_config(overrides=["model.step_marker=,", "ppo.filler_phrases=a: b: c"])
    assert config.model.step_marker == "," and config.ppo.filler_phrases == "a: b: c"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 3\nppo:\n  kl_coef: 0.2\n  mini_batch_size: 8\n")
    config = build_config(str(path), ["ppo.kl_coef=0.3"])
    assert config.seed == 3 and config.ppo.kl_coef == 0.3 and config.ppo.mini_batch_size == 8


def test_trl_aliases_map_to_canonical_names(tmp_path):
    path = tmp_path / "trl.yaml"
    path.write_text(
        "ppo:\n  cliprange: 0.15\n  init_kl_coef: 0.02\n  lam: 0.9\n  adap_kl_ctrl: true\n"
        "  target_kl: 4.0\n  batch_size: 32\n  learning_rate: 1.4e-5\n"
    )
    ppo = build_config(str(path)).ppo
    assert (ppo.clip_range, ppo.kl_coef, ppo.gae_lambda, ppo.kl_control, ppo.kl_target) == (
        0.15,
        0.02,
        0.9,
        "adaptive",
        4.0,
    )
    assert ppo.rollout_batch_size == 32 and ppo.lr == 1.4e-5


@pytest.mark.parametrize(
    "override, message",
    [
        ("ppo.clip_rnage=0.1", "unknown config key 'ppo.clip_rnage'"),
        ("nosection.x=1", "unknown config key 'nosection.x'"),
        ("ppo.steps=ten", "ppo.steps: expected an integer"),
        ("ppo.steps=1.5", "ppo.steps: expected an integer"),
        ("ppo.adaptive_kl=maybe", "ppo.adaptive_kl: expected true or false"),
        ("ppo.kl_estimator=k9", "ppo.kl_estimator: 'k9' is not one of k1, k2, k3, kl, abs, mse"),
        ("ppo.mini_batch_size=10", "must divide ppo.rollout_batch_size"),
        ("sampling.temperature=0", "sampling.temperature must be > 0"),
        ("clip_range", "must look like section.field=value"),
        ("ppo.steps=[1,", "ppo.steps: expected an integer"),  # not valid YAML: a string, then the type check
    ],
)
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(TetherError) as err:
        build_config(overrides=[override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_yaml_key_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ppo:\n  clip: 0.1\n")
    with pytest.raises(TetherError, match=r"bad.yaml: unknown config key 'ppo.clip'"):
        build_config(str(path))


def test_broken_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("ppo:\n  steps: [1, 2\n")
    with pytest.raises(TetherError, match=r"broken.yaml:\d+: invalid YAML"):
        build_config(str(path))


def test_every_field_has_a_docstring_line():
    config = RunConfig()
    text = help_text(config)
    for key in flat_keys(config):
        section, _, name = key.rpartition(".")
        cls = type(getattr(config, section)) if section else RunConfig
        assert field_docs(cls).get(name), f"{key} has no docstring line"
        assert key in text or name in text
    assert "ppo.clip_range=0.2" in text.replace(" ", "")
    assert field_docs(PPOParams)["gae_lambda"] == "GAE lambda."


def test_kl_control_choice_and_its_old_switch():
    assert build_config(overrides=["ppo.kl_control=threshold"]).ppo.kl_control == "threshold"
    assert build_config(overrides=["ppo.adap_kl_ctrl=false"]).ppo.kl_control == "fixed"
    assert build_config(overrides=["ppo.adaptive_kl=yes"]).ppo.kl_control == "adaptive"


def test_stages_from_yaml_with_the_tutorials_names(tmp_path):
    path = tmp_path / "staged.yaml"
    path.write_text(
        "stages:\n"
        "  - {name: warmup, steps: 2, lr: 5.0e-7, clip_epsilon: 0.1, init_kl_coef: 0.05, ppo_epochs: 2}\n"
        "  - {name: main, steps: 3}\n"
    )
    config = build_config(str(path))
    assert config.ppo.steps == 5  # the stages' total
    assert config.stages[0].overrides == {"lr": 5e-7, "clip_range": 0.1, "kl_coef": 0.05, "ppo_epochs": 2}
    assert [s.name for s in config.stages] == ["warmup", "main"] and config.stages[1].overrides == {}


@pytest.mark.parametrize(
    "stage, message",
    [
        ("{name: a, steps: 2, clip_rnage: 0.1}", "stages[0]: unknown config key 'clip_rnage'"),
        ("{name: a, steps: 0}", "stages[0].steps must be positive"),
        ("{name: a, steps: 2, mini_batch_size: 4}", "stages[0].mini_batch_size: fixed for the whole run"),
        ("{name: a, steps: 2, lr: fast}", "stages[0]: lr: expected a number"),
    ],
)
def test_bad_stages_name_the_stage(tmp_path, stage, message):
    path = tmp_path / "staged.yaml"
    path.write_text(f"stages:\n  - {stage}\n")
    with pytest.raises(TetherError, match=re.escape(message)):
        build_config(str(path))
