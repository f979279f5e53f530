"""Engines' compile caches: one persistent directory per model, shown in the plan."""

from __future__ import annotations

from typing import Any

from mpsd.config import parse_config
from mpsd.plan.build import HostFacts, build_plan
from mpsd.plan.engine import COMPILE_CACHES, cache_name
from mpsd.plan.view import plan_text


def plan(environ: dict[str, str], *engines: dict[str, Any]) -> Any:
    config = parse_config({"gpu": [{"device": "0", "engine": list(engines)}]})
    return build_plan(config, HostFacts(None, None, (0, 1, 2, 3), environ), "f")


def test_replicas_of_one_model_share_a_directory_under_home_and_other_models_do_not() -> None:
    groups = plan({"HOME": "/var/lib/mpsd"},
                  {"model": "Qwen/Qwen2.5-0.5B-Instruct", "replicas": 2},
                  {"model": "/models/qwen-3b", "kind": "command",
                   "command": ["serve", "{port}"]}).groups
    first, second, other = groups[0].engines
    base = "/var/lib/mpsd/.cache/mpsd/Qwen--Qwen2.5-0.5B-Instruct"
    assert first.env["VLLM_CACHE_ROOT"] == f"{base}/vllm"
    assert first.env["TRITON_CACHE_DIR"] == f"{base}/triton"
    assert first.env["TORCHINDUCTOR_CACHE_DIR"] == f"{base}/inductor"
    assert {k: first.env[k] for k in COMPILE_CACHES} == {k: second.env[k] for k in COMPILE_CACHES}
    assert other.env["VLLM_CACHE_ROOT"].startswith("/var/lib/mpsd/.cache/mpsd/qwen-3b-")
    assert f"env:  VLLM_CACHE_ROOT={base}/vllm" in plan_text(plan(
        {"HOME": "/var/lib/mpsd"}, {"model": "Qwen/Qwen2.5-0.5B-Instruct"}))


def test_the_operators_own_settings_win() -> None:
    environ = {"HOME": "/home/op", "XDG_CACHE_HOME": "/fast/cache", "TRITON_CACHE_DIR": "/t"}
    mine = {"model": "m", "env": {"VLLM_CACHE_ROOT": "/mine"}}
    env = plan(environ, mine).groups[0].engines[0].env
    assert env["VLLM_CACHE_ROOT"] == "/mine"
    assert env["TRITON_CACHE_DIR"] == "/t"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "/fast/cache/mpsd/m/inductor"


def test_without_a_home_nothing_is_set() -> None:
    env = plan({"PATH": "/usr/bin", "XDG_CACHE_HOME": "relative"},
               {"model": "m"}).groups[0].engines[0].env
    assert not set(COMPILE_CACHES) & set(env)


def test_cache_names_are_one_safe_path_component() -> None:
    assert cache_name("org/name:rev") == "org--name_rev"
    assert cache_name("..") == "model"
    a, b = cache_name("/a/model"), cache_name("/b/model")
    assert a != b and a.startswith("model-") and "/" not in a
