"""`klong`: record agent rollouts as events, archive them, query them with SQL, build versioned datasets and train.

Every command takes `--home DIR` (env KLONG_HOME, default ./klong-data) and `--bootstrap-servers`
(env KLONG_BOOTSTRAP_SERVERS, default: the embedded broker of the home). Run `klong COMMAND --help`.
Errors are one line on stderr (exit 2); Ctrl-C stops a command with one line saying what was kept (exit 130).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from klong.cli_output import StageBars, _print_table, _progress
from schemas.errors import KlongError

ENV_HELP = "(env KLONG_HOME; default ./klong-data)"
# Every command group lives in its own module with register(sub, common); this order is the --help order.
EXTENSIONS = ["klong.cli_ingest", "klong.cli_dataset", "klong.cli_tasks", "klong.cli_judge", "klong.cli_train",
              "klong.cli_rl", "klong.cli_rollout", "klong.cli_import", "klong.cli_serve", "klong.cli_model",
              "klong.cli_ui", "klong.cli_archive"]
__all__ = ["EXTENSIONS", "IntermixedParser", "StageBars", "_print_table", "_progress", "build_parser", "main"]


# ---- parser -----------------------------------------------------------------------------------------


class IntermixedParser(argparse.ArgumentParser):
    """Lets `key=value` overrides follow options (`dataset build NAME --kind rl max_tokens=4096`): plain
    argparse takes the positionals in one go and would reject the overrides after `--kind rl`."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:  # parse_known_intermixed_args calls back here
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def build_parser() -> argparse.ArgumentParser:
    def add_common(parser, default):
        parser.add_argument("--home", default=default, help=f"data home {ENV_HELP}")
        parser.add_argument("--bootstrap-servers", default=default, help="Kafka servers host:port[,...] (env "
                            "KLONG_BOOTSTRAP_SERVERS; default: the embedded broker of the home)")
        parser.add_argument("--topic-prefix", default=default, help="topic name prefix (env KLONG_TOPIC_PREFIX; default klong)")
        parser.add_argument("-v", "--verbose", action="store_true", default=default or False, help="log debug details")
        parser.add_argument("-q", "--quiet", action="store_true", default=default or False, help="no progress bars")

    # Common flags work before or after the command: `klong --home H sql ...` and `klong sql ... --home H`.
    common = argparse.ArgumentParser(add_help=False)
    add_common(common, argparse.SUPPRESS)
    p = argparse.ArgumentParser(prog="klong", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p, None)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for ext in EXTENSIONS:
        importlib.import_module(ext).register(sub, common)
    _describe_pages(p)
    return p


def _describe_pages(parser: argparse.ArgumentParser) -> None:
    """Every `klong ... --help` page gets a description: its own, else the one-line help it is listed with."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, page in action.choices.items():
                if not page.description and helps.get(name):
                    page.description = helps[name][0].upper() + helps[name][1:] + "."
                page.description = _for_users(page.description)
                _describe_pages(page)


_MODULES = r"(?:schemas|core|services|store|producers|consumers|trainer|rl|ui|klong)\.[a-z_.]+"


def _for_users(text: str | None) -> str | None:
    """A help page speaks of commands, files and settings, not of the Python modules behind them: drops
    `(ui.report)`-style references and "The library is `...`." sentences from module docstrings."""
    import re

    if not text:
        return text
    text = re.sub(rf"\s*The library is\s+`{_MODULES}`\.", "", text)
    return re.sub(rf" ?\((?:{_MODULES})(?:,\s*{_MODULES})*\)", "", text)


# Commands that only read a data home: a home that is not one is an error for them (mistyped --home),
# not an empty world. Commands that write (broker start, sink, simulate, imports, runs) create it.
READS_HOME = {"sql", "status", "archive", "lineage", "ui", "report", "replay", "dataset list", "dataset show",
              "dataset diff", "dataset export", "dataset build", "tasks list", "tasks show", "judge status",
              "rl status"}


def _reads_home(args) -> bool:
    return args.command in READS_HOME or f"{args.command} {getattr(args, 'action', '')}" in READS_HOME


def _settings_for_home_check(args):
    from core.settings import Settings

    return Settings.load(getattr(args, "home", None))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from core.settings import install_log_redaction

    install_log_redaction()  # no secret in any log line, at any level
    if not args.verbose:
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
    try:
        if _reads_home(args):
            _settings_for_home_check(args).require_home()
        return args.func(args)
    except KlongError as e:
        print(f"klong {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # commands that keep partial work say what they kept before this point
        print(f"klong {args.command}: interrupted (Ctrl-C); nothing after this point was done", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # an unwritable or missing path (a home on a read-only disk...): one line naming it
        if e.filename is None:
            raise
        print(f"klong {args.command}: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2


def run() -> None:
    """The `klong` command: `main()`, then Python's own shutdown steps that matter (non-daemon threads and
    thread-pool executors joined, atexit handlers run, stdout/stderr flushed), then `os._exit`. What that
    skips is the interpreter's teardown and the C++ static destructors at exit: a native thread pool (Arrow's,
    DuckDB's) destroyed there while a worker is still joinable aborts a process whose work is done
    ("terminate called without an active exception", exit 134: seen once after `klong archive repair` had
    printed its result, beside a busy test suite). An exception out of `main()` exits the usual way."""
    import atexit
    import threading

    code = main()
    try:
        threading._shutdown()  # what interpreter shutdown does first (CPython's private hook; Python 3.11-3.14)
    finally:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: the output is gone either way
                pass
        os._exit(code if isinstance(code, int) else 1)


if __name__ == "__main__":
    run()
