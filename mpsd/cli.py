"""The ``mpsd`` command (architecture.md §7): run, check-config, status, restart, drain, reload,
bench and tune.

Exit codes: 0 ok, 1 runtime failure, 2 usage, 78 config error (the unit's
``RestartPreventExitStatus=78`` keeps a typo from becoming a restart loop), 130 after Ctrl-C and
141 when the reader of the output went away (``mpsd status | head``), as a shell reports a
command ended by SIGINT or SIGPIPE. Neither of the last two prints a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import anyio

from mpsd import __version__, logs, state_lock
from mpsd.bench import command as bench_command
from mpsd.bench import tune
from mpsd.config import config_path
from mpsd.control import client as control_client
from mpsd.errors import ConfigError, ExitCode, MpsdError
from mpsd.host import facts
from mpsd.plan.view import plan_dict, plan_text
from mpsd.supervise.preflight import cannot_start, preflight, start_up_only

#: What a shell reports for a command ended by SIGINT (Ctrl-C) and by SIGPIPE (a closed pipe).
INTERRUPTED = 130
PIPE_CLOSED = 141


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, unless there is none worth showing (None, a
    flag's False, "") or the help already says it in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, "") or "default" in text:
            return text
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpsd", description="Many small LLM engines on one GPU host under NVIDIA MPS.",
        formatter_class=_DefaultsFormatter)
    parser.add_argument("--version", action="version", version=f"mpsd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the daemon in the foreground (what systemd runs)")
    check = sub.add_parser("check-config", help="validate the config and print the plan")
    for p in (run, check):
        p.add_argument("-c", "--config", help="config file (default: $MPSD_CONFIG or "
                       "/etc/mpsd/mpsd.toml)")
    check.add_argument("--json", action="store_true", help="print the plan as JSON")
    check.add_argument("--file-only", action="store_true",
                       help="check the file and its plan only, not this host's executables, "
                       "models, ports and directories (a config meant for another host)")
    status = sub.add_parser("status", help="show GPUs, engines and faults of the running daemon")
    status.add_argument("gpu", metavar="GPU", nargs="?",
                        help="only this GPU: gpu0, a device index or a UUID")
    status.add_argument("--json", action="store_true", help="print the raw status JSON")
    restart = sub.add_parser("restart", help="restart one GPU (clears FAILED)")
    drain = sub.add_parser("drain", help="drain and stop one GPU (or --all) until "
                           "`mpsd restart GPU`")
    restart.add_argument("gpu", metavar="GPU", help="gpu0, a device index or a UUID")
    drain.add_argument("gpu", metavar="GPU", nargs="?", help="gpu0, a device index or a UUID")
    drain.add_argument("--all", action="store_true", help="the whole node: /health 503 first, "
                       "requests served for proxy.unready_grace_s, then every GPU")
    drain.set_defaults(usage_error=drain.error)  # says drain's usage, not the top level's
    reload = sub.add_parser("reload", help="re-read the config and apply it (like SIGHUP)")
    for p in (status, restart, drain, reload):
        p.add_argument("-c", "--config", help="config file, to find daemon.state_dir")
        p.add_argument("--socket", help="control socket (default: <state_dir>/control.sock)")
    bench_command.add_parser(sub)
    tune.add_parser(sub)
    for command in sub.choices.values():
        command.formatter_class = _DefaultsFormatter
    return parser


def _control(args: argparse.Namespace, file: str) -> int:
    sock = control_client.resolve_socket(args.socket, file)
    hint = "" if args.socket else control_client.not_running_hint(
        file, _chosen_by(args), args.command)
    if args.command == "status":
        return control_client.status(sock, args.json, hint=hint, gpu=args.gpu)
    if args.command == "restart":
        return control_client.restart(sock, args.gpu, hint)
    if args.command == "drain" and args.all:
        return control_client.drain_all(sock, hint)
    if args.command == "drain":
        return control_client.drain(sock, args.gpu, hint)
    return control_client.reload(sock, hint)


def _chosen_by(args: argparse.Namespace) -> str:
    """Why this config file, in the words of :func:`mpsd.config.config_path`."""
    if args.config:
        return "given with -c"
    if os.environ.get("MPSD_CONFIG"):
        return "from $MPSD_CONFIG"
    return "the default: no -c, $MPSD_CONFIG not set"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code.

    Ctrl-C and a reader that closed the pipe end a command quietly: both are how people stop
    a command, not failures of mpsd worth a traceback.
    """
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print(file=sys.stderr)  # the terminal echoed ^C: end that line
        return INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return PIPE_CLOSED


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "drain" and (args.all == (args.gpu is not None)):
        args.usage_error("give a GPU (gpu0, a device index or a UUID) or --all, not both")
    file = config_path(args.config)
    if args.command in ("status", "restart", "drain", "reload"):
        return _control(args, file)
    if args.command == "bench":
        return bench_command.run(args, file)
    if args.command == "tune":
        return tune.run(args)
    try:
        if args.command == "check-config":
            return _check_config(file, args.json, args.file_only)
        logs.setup("auto")
        from mpsd import daemon  # noqa: PLC0415 - the proxy's imports are for serving only

        try:
            return int(anyio.run(daemon.run, file, backend_options={"use_uvloop": True}))
        except KeyboardInterrupt:  # before the daemon's own signal handling took over
            return ExitCode.OK
    except ConfigError as exc:
        print(f"mpsd: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except MpsdError as exc:
        print(f"mpsd: {exc}", file=sys.stderr)
        return ExitCode.FAILURE


def _check_config(file: str, as_json: bool, file_only: bool) -> int:
    """Print the plan, then run the preflight ``mpsd run`` and ``mpsd reload`` run (exit 78
    with every problem it finds) and say what only start-up can tell. Only warnings and the
    verdict reach stderr (the plan itself says why MPS is on or off, so e.g. "no NVML here"
    needs no log line of its own)."""
    logs.setup("console", "warning")
    resolved = anyio.run(facts.resolve, file)
    problems, checked = ([], "the file and its plan") if file_only else _preflight(resolved)
    later = start_up_only(resolved.plan)
    if as_json:
        print(json.dumps({**plan_dict(resolved.plan), "problems": problems,
                          "checked": "file" if file_only else "host",
                          "start_up_only": later}, indent=2))
    else:
        print(plan_text(resolved.plan))
        print(f"\nchecked: {checked}\nonly start-up can tell:"
              + "".join(f"\n  - {line}" for line in later))
    if problems:
        print(f"mpsd: {cannot_start(file, problems)}", file=sys.stderr)
        return ExitCode.CONFIG
    return ExitCode.OK


def _preflight(resolved: facts.Resolved) -> tuple[list[str], str]:
    """The preflight of :func:`mpsd.supervise.preflight.preflight` as ``mpsd run`` would run
    it now, and what it checked: while a daemon owns the state directory, its engines' ports
    and its proxy's address are its own, not taken; one that owns it but cannot be asked
    (its control socket is not ours to open) leaves the ports unchecked, and says so."""
    config, plan = resolved.config, resolved.plan
    state_dir = config.daemon.state_dir
    checked = "the file, its plan, executables, models, ports and directories"
    held = control_client.running_engine_ports(state_dir)
    if held is None and state_lock.held(state_dir):
        held = [e.port for g in plan.groups for e in g.engines]
        checked = ("the file, its plan, executables, models and directories; not the ports: "
                   "the mpsd that owns daemon.state_dir did not answer on its control socket")
    problems = preflight(plan, control_binary=config.mps.control_binary, state_dir=state_dir,
                         held_ports=held or (),
                         listen=None if held is not None else (config.proxy.host,
                                                               config.proxy.port))
    return problems, checked


if __name__ == "__main__":
    sys.exit(main())
