"""The ``mixmap`` command line: one module per command, each a thin call into the library."""

from mixmap.cli.app import app

__all__ = ["app"]
