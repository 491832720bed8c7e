"""The ``peft-layersched`` program: a file per subcommand."""

# isort: off
# The subcommands register in this order, the order the help lists them in (demo: when a parser is built).
from .program import main, register_subcommand
from . import plan, inspect  # noqa: F401
# isort: on

__all__ = ["main", "register_subcommand"]
