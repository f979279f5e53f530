"""The config contract: defaults merge, every invalid class names file, key and fix."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from mpsd.config import (
    Config,
    EngineConfig,
    GpuConfig,
    load_config,
    parse_config,
    parse_cpu_list,
    parse_size,
)
from mpsd.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def minimal(**engine: Any) -> dict[str, Any]:
    return {"gpu": [{"device": "0", "engine": [{"model": "m", **engine}]}]}


def test_shipped_example_config_loads() -> None:
    config = load_config(REPO / "etc" / "mpsd" / "mpsd.toml")
    engine = config.gpu[0].engine[0]
    assert engine.replicas == 2
    assert engine.cpu_affinity == "auto"
    assert config.proxy.port == 8000


def test_defaults_are_inherited_and_overridden() -> None:
    raw = minimal(stop_timeout_s=5)
    raw["defaults"] = {"stop_timeout_s": 9, "health_failures": 7}
    engine = parse_config(raw).gpu[0].engine[0]
    assert engine.stop_timeout_s == 5
    assert engine.health_failures == 7


@pytest.mark.parametrize(
    ("raw", "key", "fix_word"),
    [
        ({"gpu": []}, "gpu", "add"),
        ({"gpu": [{"device": "0", "engine": [{"model": "m", "replcas": 2}]}]},
         "gpu[0].engine[0].replcas", "spelling"),
        (minimal(replicas=0), "gpu[0].engine[0].replicas", "larger"),
        (minimal(gpu_memory_utilization=0.5, replicas=2), "gpu[0]", "0.95"),
        (minimal(kind="command"), "gpu[0].engine[0]", "{port}"),
        (minimal(kind="command", command=["srv"]), "gpu[0].engine[0]", "port"),
        (minimal(pinned_memory_limit="lots"), "gpu[0].engine[0].pinned_memory_limit", "30G"),
        (minimal(cpu_affinity=["0-3"], replicas=2), "gpu[0].engine[0]", "per replica"),
        (minimal(cpu_affinity=["a"]), "gpu[0].engine[0].cpu_affinity", "cpu list"),
        (minimal(env={"NOTIFY_SOCKET": "x"}), "gpu[0].engine[0].env", "etc/mpsd"),
        (minimal(pinned_memory_limit="10G", gpu_memory_utilization=0.3),
         "gpu[0].engine[0]", "not both"),
        ({"mps": {"enabled": "maybe"}, **minimal()}, "mps.enabled", "values"),
        ({"proxy": {"listen": "8000"}, **minimal()}, "proxy.listen", "127.0.0.1:8000"),
        ({"proxy": {"max_request_line_bytes": 100_000}, **minimal()}, "proxy",
         "max_head_bytes"),
        ({"proxy": {"head_timeout_s": 0}, **minimal()}, "proxy.head_timeout_s", "greater"),
        ({"defaults": {"modle": "x"}, **minimal()}, "defaults.modle", "one of"),
        ({"gpu": [{"device": "0", "engine": [{"model": "a"}, {"model": "a"}]}]},
         "gpu[0]", "distinct name"),
        ({"gpu": [{"device": "0", "engine": [{"model": "a"}]},
                  {"device": "0", "engine": [{"model": "b"}]}]}, "", "distinct"),
    ],
)
def test_invalid_configs_name_key_and_fix(raw: dict[str, Any], key: str, fix_word: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "/etc/mpsd/mpsd.toml")
    err = info.value
    assert err.file == "/etc/mpsd/mpsd.toml"
    assert err.key == key
    assert fix_word in str(err)
    assert "Fix:" in str(err)


def test_toml_syntax_error_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[proxy\nlisten = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(path)
    assert info.value.file == str(path)


def test_missing_file_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(("text", "expected"), [("30G", 30 << 30), ("512M", 512 << 20),
                                                 ("1.5G", int(1.5 * (1 << 30))), ("64k", 65536)])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(("text", "expected"), [("0-3", (0, 1, 2, 3)), ("1,3", (1, 3)),
                                                ("4,0-1", (0, 1, 4))])
def test_parse_cpu_list(text: str, expected: tuple[int, ...]) -> None:
    assert parse_cpu_list(text) == expected


def test_config_is_frozen() -> None:
    config: Config = parse_config(minimal())
    with pytest.raises(ValueError, match="frozen"):
        config.gpu[0].engine[0].replicas = 3  # type: ignore[misc]


def test_relative_paths_are_taken_from_the_config_files_directory(tmp_path: Path) -> None:
    conf = tmp_path / "etc" / "mpsd.toml"
    (tmp_path / "etc" / "tiny").mkdir(parents=True)
    conf.write_text('[daemon]\nstate_dir = "../run"\nlog_dir = "log"\n'
                    '[proxy]\napi_keys_file = "keys"\n[mps]\ncontrol_binary = "./bin/mps"\n'
                    '[defaults]\nexecutable = "../venv/bin/vllm"\n'
                    '[[gpu]]\ndevice = "0"\n'
                    '[[gpu.engine]]\nmodel = "tiny"\n'
                    '[[gpu.engine]]\nmodel = "Qwen/Qwen2.5-0.5B-Instruct"\nexecutable = "vllm"\n'
                    '[[gpu.engine]]\nmodel = "/models/x"\nkind = "command"\n'
                    'command = ["./serve", "{port}"]\n')
    config = load_config(conf)
    assert config.daemon.state_dir == tmp_path / "run"
    assert config.daemon.log_dir == tmp_path / "etc" / "log"
    assert config.proxy.api_keys_file == str(tmp_path / "etc" / "keys")
    assert config.mps.control_binary == str(tmp_path / "etc" / "bin" / "mps")
    local, hub, command = config.gpu[0].engine
    assert local.executable == str(tmp_path / "venv" / "bin" / "vllm")
    assert local.model == str(tmp_path / "etc" / "tiny")
    assert local.served_name == "tiny" and local.display_name == "tiny"  # as clients know it
    assert hub.model == "Qwen/Qwen2.5-0.5B-Instruct" and hub.executable == "vllm"  # PATH lookup
    assert command.command == [str(tmp_path / "etc" / "serve"), "{port}"]
    assert command.model == "/models/x"
    assert parse_config({"daemon": {"state_dir": "rel"}, "gpu": config.model_dump()["gpu"]}
                        ).daemon.state_dir == Path("rel")  # only a file has a directory


def _documented_keys(text: str) -> dict[str, set[str]]:
    """``key = …`` lines (also commented out, ``# key = …``) of each section of a TOML file."""
    found: dict[str, set[str]] = {}
    section = ""
    for line in text.splitlines():
        header = re.match(r"^\s*\[\[?([\w.]+)\]\]?", line)
        if header:
            section = header.group(1)
            found.setdefault(section, set())
            continue
        key = re.match(r"^\s*#?\s*([a-z_]+)\s*=", line)
        if key and section:
            found[section].add(key.group(1))
    return found


def test_every_config_key_is_documented_in_the_shipped_file() -> None:
    documented = _documented_keys((REPO / "etc" / "mpsd" / "mpsd.toml").read_text())
    sections: dict[str, type[BaseModel]] = {
        name: info.annotation for name, info in Config.model_fields.items()
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)}
    assert set(sections) == {"daemon", "proxy", "mps", "restart"}
    missing = [f"[{name}] {key}" for name, model in sections.items()
               for key in model.model_fields if key not in documented.get(name, set())]
    missing += [f"[[gpu]] {key}" for key in GpuConfig.model_fields
                if key != "engine" and key not in documented["gpu"]]
    engine_keys = documented["defaults"] | documented["gpu.engine"]
    missing += [f"engine {key}" for key in EngineConfig.model_fields if key not in engine_keys]
    assert not missing, "document these keys in etc/mpsd/mpsd.toml"
