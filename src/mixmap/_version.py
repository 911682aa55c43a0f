"""The installed version (a module of its own, so that the package's modules can read it
without importing the package root)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mixmap")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
