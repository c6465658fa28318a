"""The `ddm` command line. Errors are one line, mapped to exit codes in one place (`main`): a `DDMError`
carries its own code (2 bad usage or config, 1 a failed run); an OS or network error is a failed run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from common.config import resolve_config, to_yaml
from common.errors import EXIT_FAILURE, DDMError, UsageError

__all__ = ["COMMANDS", "UsageError", "add_config_args", "build_parser", "main", "one_line"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UsageError(f"{self.prog}: {message}")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="named preset (default: digits)")
    parser.add_argument("--config", help="YAML file (may name a base `preset:`)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. clustering.num_experts=8 (repeatable)")


def cmd_config_show(args: argparse.Namespace) -> int:
    config = resolve_config(args.preset, args.config, args.overrides)
    from worker.budget import format_budget, training_budget  # after validation: a bad config fails fast

    sys.stdout.write(to_yaml(config) + format_budget(training_budget(config)))
    if config.hires is not None:  # the continuation's own budget, at its size
        hires = {**training_budget(config.hires_run_config()), "rule": "hires.total_nimg split over K"}
        sys.stdout.write(format_budget(hires, heading="hires budget"))
    return 0


# Other modules register their subcommands here; a command that is not built is not registered.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ddm", description="Train Decentralized Diffusion Models on isolated compute islands.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    config = sub.add_parser("config", help="show the resolved configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    show = config_sub.add_parser("show", help="print the resolved config as YAML")
    add_config_args(show)
    show.set_defaults(func=cmd_config_show)
    for register in COMMANDS:
        register(sub)
    return parser


def _load_commands() -> None:
    import importlib

    for module in ("orchestrator.cmd_pipeline", "orchestrator.cmd_results", "orchestrator.submit"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def main(argv: Sequence[str] | None = None) -> int:
    _load_commands()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except DDMError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except (OSError, ConnectionError) + _foreign_errors() as exc:
        # The environment failed (disk, network, an object store): one line; rerunning resumes.
        print(f"error: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def one_line(exc: BaseException, limit: int = 500) -> str:
    """The first line of an error's message, capped (a message must never flood the terminal)."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    text = lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _foreign_errors() -> tuple[type[BaseException], ...]:
    """Storage-client errors that are not OSErrors (botocore's), when that client is loaded at all."""
    botocore = sys.modules.get("botocore.exceptions")
    return (botocore.BotoCoreError,) if botocore is not None else ()


if __name__ == "__main__":
    sys.exit(main())
