"""The `gym:` config section: shipped configs by name, agents, data files, errors that name keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gym.config import GymConfig

SM_DATA = "resources_servers/string_match/data/example.jsonl"


def _cfg(**env) -> GymConfig:
    return GymConfig(envs=[{"name": "sm", "config": "string_match", "train_data": SM_DATA, **env}])


def test_a_shipped_config_by_name_resolves_in_the_gym_install_with_its_agent():
    cfg = _cfg()
    root = cfg.gym_root()
    env = cfg.envs[0]
    assert env.config == str(root / "resources_servers/string_match/configs/string_match.yaml")
    assert env.agent == "string_match_simple_agent"
    assert env.train_data == str(root / SM_DATA)
    assert cfg.config_paths() == [
        env.config, str(root / "responses_api_models/vllm_model/configs/vllm_model_for_training.yaml")]


def test_several_envs_run_side_by_side():
    cfg = GymConfig(envs=[
        {"name": "sm", "config": "string_match", "train_data": SM_DATA},
        {"name": "bj", "config": "blackjack", "train_data": "resources_servers/blackjack/data/example.jsonl"},
        {"name": "tool", "config": "example_single_tool_call",
         "train_data": "resources_servers/example_single_tool_call/data/example.jsonl"},
    ])
    assert [e.agent for e in cfg.envs] == [
        "string_match_simple_agent", "blackjack_gymnasium_agent", "example_single_tool_call_simple_agent"]
    assert len(cfg.config_paths()) == 4


def test_an_unknown_key_is_an_error_naming_it():
    with pytest.raises(ValidationError, match="concurency"):
        GymConfig(envs=[{"name": "sm", "config": "string_match", "train_data": SM_DATA}], concurency=4)
    with pytest.raises(ValidationError, match="train_dta"):
        GymConfig(envs=[{"name": "sm", "config": "string_match", "train_dta": SM_DATA}])


def test_an_unknown_config_name_is_an_error_naming_the_key():
    with pytest.raises(ValidationError, match=r"envs\[0\]\.config: no shipped Gym config named 'no_such_env'"):
        _cfg(config="no_such_env")


def test_a_missing_data_file_is_an_error_naming_the_key():
    with pytest.raises(ValidationError, match=r"envs\[0\]\.eval_data: no file 'nope.jsonl'"):
        _cfg(eval_data="nope.jsonl")


def test_an_agent_the_config_does_not_define_is_an_error():
    with pytest.raises(ValidationError, match=r"envs\[0\]\.agent: 'blackjack_gymnasium_agent' is not an agent"):
        _cfg(agent="blackjack_gymnasium_agent")


def test_a_config_path_and_absolute_data_path_work(tmp_path: Path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"responses_create_params": {"input": "hi"}}\n')
    root = _cfg().gym_root()
    cfg = _cfg(config=str(root / "resources_servers/string_match/configs/string_match.yaml"), train_data=str(data))
    assert cfg.envs[0].train_data == str(data)


def test_head_port_inside_the_port_range_is_refused():
    with pytest.raises(ValidationError, match="head_port: 11500 lies inside port_range"):
        GymConfig(envs=[{"name": "sm", "config": "string_match", "train_data": SM_DATA}], head_port=11500)


def test_overrides_merge_env_then_global():
    cfg = GymConfig(
        envs=[{"name": "sm", "config": "string_match", "train_data": SM_DATA,
               "overrides": {"string_match_simple_agent": {"responses_api_agents": {"simple_agent": {"max_steps": 2}}}}}],
        overrides={"policy_model": {"responses_api_models": {"vllm_model": {"uses_reasoning_parser": False}}}},
    )
    assert cfg.gym_overrides() == {
        "string_match_simple_agent": {"responses_api_agents": {"simple_agent": {"max_steps": 2}}},
        "policy_model": {"responses_api_models": {"vllm_model": {
            "replace_developer_role_with_system": True,   # our default
            "uses_reasoning_parser": False,
        }}},
    }


def test_a_venv_without_python_is_an_error_naming_the_key(tmp_path: Path):
    with pytest.raises(ValidationError, match="venv: no Python at"):
        GymConfig(envs=[{"name": "sm", "config": "string_match", "train_data": SM_DATA}], venv=str(tmp_path))


def test_every_nemo_gym_internal_the_launcher_uses_is_still_there():
    # gym/gym_internals.py names what a Gym upgrade moved; the launcher would fail mid-run instead
    import subprocess

    venv_python = _cfg().venv_path() / "bin" / "python"
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([str(venv_python), "-P", str(root / "gym" / "gym_internals.py")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip() == "all NeMo Gym internals present"
