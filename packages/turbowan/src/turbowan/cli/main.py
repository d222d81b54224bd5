"""Dispatcher for `turbowan <command>`.

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` and
``run(args) -> int``; modules are imported only when their command runs, except for
building the parser, which needs only argparse.
"""

from __future__ import annotations

import argparse
import importlib
import sys

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
#: exit status for an offloadkit plugin setup that cannot work (as for bad input)
EXIT_BAD_SETUP = 2

# command name -> module holding add_parser() and run()
COMMANDS = {
    "generate": "turbowan.cli.generate",
    "decode": "turbowan.cli.decode",
    "manifest": "turbowan.cli.manifest",
    "check": "turbowan.cli.check",
    "quantize": "turbowan.cli.quantize",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turbowan",
        description="TurboDiffusion Wan2.2 image-to-video with offloadkit placement.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS.values():
        module = importlib.import_module(module_name)
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from turbowan.interrupts import signals_as_interrupt

    with signals_as_interrupt() as stop:  # SIGTERM/SIGHUP take Ctrl-C's cleanup paths
        try:
            module = importlib.import_module(COMMANDS[args.command])
            code = int(module.run(args) or 0)
        except KeyboardInterrupt:  # a command without its own handling: no traceback
            print(f"turbowan {args.command}: interrupted", file=sys.stderr)
            code = EXIT_INTERRUPTED
        except Exception as exc:
            # a broken plugin setup (two plugins claiming one strategy name, a junk
            # OFFLOADKIT_* switch) is the user's installation to fix: one line, not a traceback
            from offloadkit import PluginError

            if not isinstance(exc, PluginError):
                raise
            print(f"turbowan {args.command}: error: {exc}", file=sys.stderr)
            code = EXIT_BAD_SETUP
    return stop.exit_code(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
