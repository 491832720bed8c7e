"""The ``peft-layersched`` program: a file per subcommand."""

from .program import main, register_subcommand

__all__ = ["main", "register_subcommand"]
