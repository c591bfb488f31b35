"""The command line: ``vislang SUBCOMMAND``. ``main`` builds the parser; each module here is one command group, a thin
parser over library functions (``register(add)`` adds its subcommands). ``python -m vislang.cli`` runs it too (what
torchrun needs)."""

from .main import build_parser, main, parse_command, train_run_config

__all__ = ["build_parser", "main", "parse_command", "train_run_config"]
