"""The import rules of docs/architecture.md, read from the source with :mod:`ast`.

Every ``import`` counts, including the ones inside functions and ``if TYPE_CHECKING:`` blocks:
a rule that holds only at run time still couples the packages for a reader.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mpsd"

# Layer -> layers it must never import. A layer is the first component under ``mpsd``
# (``mpsd.supervise.group`` -> ``supervise``; ``mpsd.pool`` -> ``pool``).
FORBIDDEN: dict[str, frozenset[str]] = {
    "supervise": frozenset({"proxy", "observe", "control"}),
    "proxy": frozenset({"supervise", "observe", "control", "host"}),
    "plan": frozenset({"supervise", "proxy", "observe", "control", "pool"}),
    "config": frozenset({"plan", "host", "supervise", "proxy", "observe", "control", "pool"}),
    "pool": frozenset({"plan", "host", "supervise", "proxy", "observe", "control"}),
    "backend": frozenset({"config", "plan", "host", "pool", "supervise", "proxy", "observe",
                          "control"}),
    "status": frozenset({"config", "plan", "host", "pool", "supervise", "proxy", "observe",
                         "control"}),
    # bench drives a daemon from outside, as an operator does: HTTP, a child process, the
    # control socket's client; never the daemon's insides
    "bench": frozenset({"supervise", "proxy", "observe", "pool", "backend", "daemon"}),
}
COMPOSERS = frozenset({"daemon", "cli", "__main__"})

# The pure layers decide; they never touch a socket, a process or the network.
PURE = frozenset({"plan", "config", "pool", "backend", "status"})
IO_MODULES = frozenset({"socket", "subprocess", "selectors", "ssl", "http", "urllib", "aiohttp",
                        "anyio", "multiprocessing", "signal", "shutil", "threading", "pynvml"})
# asyncio is allowed in the pool for its futures and timeouts; its I/O entry points are not.
ASYNCIO_IO = frozenset({"open_connection", "start_server", "open_unix_connection",
                        "start_unix_server", "create_subprocess_exec", "create_subprocess_shell",
                        "to_thread", "create_connection", "create_server", "create_unix_server",
                        "create_unix_connection", "subprocess_exec", "subprocess_shell",
                        "sock_connect", "sock_recv", "sock_sendall", "run_in_executor"})


@dataclass(frozen=True)
class Module:
    name: str
    layer: str
    tree: ast.Module

    def imported(self) -> set[str]:
        """Every module name this module imports (absolute, ``mpsd.x.y`` or a third party)."""
        names: set[str] = set()
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert node.level == 0, f"{self.name}: use absolute imports"
                names.add(node.module)
                if node.module == "mpsd":  # ``from mpsd import logs`` imports mpsd.logs
                    names.update(f"mpsd.{alias.name}" for alias in node.names)
        return names

    def mpsd_layers(self) -> set[str]:
        return {layer_of(n) for n in self.imported() if n.startswith("mpsd.")} - {self.layer}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mpsd"


def modules() -> list[Module]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        found.append(Module(name, layer_of(name), ast.parse(path.read_text(), str(path))))
    return found


MODULES = modules()


def test_the_tree_is_what_the_rules_talk_about() -> None:
    layers = {m.layer for m in MODULES}
    assert {"supervise", "proxy", "plan", "config", "pool", "observe", "control", "host",
            "daemon", "cli"} <= layers


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_forbidden_layers(module: Module) -> None:
    bad = module.mpsd_layers() & FORBIDDEN.get(module.layer, frozenset())
    assert not bad, f"{module.name} ({module.layer}) imports {sorted(bad)}"


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_only_daemon_and_cli_compose(module: Module) -> None:
    """Nothing but the composition root imports it: the packages never know who wires them."""
    if module.layer in COMPOSERS:
        return
    bad = module.mpsd_layers() & COMPOSERS
    assert not bad, f"{module.name} imports the composition root {sorted(bad)}"


@pytest.mark.parametrize("module", [m for m in MODULES if m.layer in PURE], ids=lambda m: m.name)
def test_pure_layers_do_no_io(module: Module) -> None:
    io = {n for n in module.imported() if n.split(".")[0] in IO_MODULES}
    assert not io, f"{module.name} imports I/O modules {sorted(io)}"
    calls = {node.attr for node in ast.walk(module.tree)
             if isinstance(node, ast.Attribute) and node.attr in ASYNCIO_IO}
    assert not calls, f"{module.name} uses asyncio I/O {sorted(calls)}"


def test_the_rules_can_fail() -> None:
    """The checker itself sees a forbidden import (so a green run means something)."""
    fake = Module("mpsd.supervise.x", "supervise",
                  ast.parse("from mpsd.proxy.server import ProxyServer\nimport socket\n"))
    assert fake.mpsd_layers() & FORBIDDEN["supervise"] == {"proxy"}
    assert "socket" in fake.imported()
