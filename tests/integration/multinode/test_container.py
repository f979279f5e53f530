"""packaging/container/Containerfile checked without a registry: what it copies exists, the
vLLM base is a build argument, mpsd is installed from its wheel, the user is the DaemonSet's,
and the entrypoint is a command mpsd's own CLI takes. Building it needs vLLM's base image (pulled
from a registry), which CI machines without one cannot do.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import yaml

from mpsd.cli import _parser
from tests.harness import REPO

CONTAINERFILE = REPO / "packaging" / "container" / "Containerfile"
DAEMONSET = REPO / "deploy" / "kubernetes" / "daemonset.yaml"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line.removesuffix("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def test_every_file_it_copies_exists_and_the_base_is_a_build_argument() -> None:
    steps = instructions()
    copies = [shlex.split(args) for word, args in steps if word == "COPY"]
    sources = [s for parts in copies if not parts[0].startswith("--from=") for s in parts[:-1]]
    assert sources, "nothing copied from the context"
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    (arg,) = [args for word, args in steps if word == "ARG"]
    name = arg.partition("=")[0]
    assert [args.split()[0] for word, args in steps if word == "FROM"] == [f"${{{name}}}"] * 2


def test_it_installs_the_wheel_and_runs_mpsd_as_the_daemonsets_user() -> None:
    steps = dict(reversed(instructions()))  # the first of each instruction
    runs = [args for word, args in instructions() if word == "RUN"]
    assert any("pip wheel" in r for r in runs) and any("pip install" in r and ".whl" in r
                                                       for r in runs)
    pod = yaml.safe_load(DAEMONSET.read_text())["spec"]["template"]["spec"]["securityContext"]
    assert steps["USER"] == f"{pod['runAsUser']}:{pod['runAsGroup']}"
    entrypoint, cmd = json.loads(steps["ENTRYPOINT"]), json.loads(steps["CMD"])
    assert entrypoint == ["mpsd"]
    args = _parser().parse_args(cmd)
    assert (args.command, args.config) == ("run", "/etc/mpsd/mpsd.toml")
    version = subprocess.run([sys.executable, "-m", "mpsd", "--version"], capture_output=True,
                             text=True, timeout=30, check=True)
    assert version.stdout.startswith("mpsd ")

