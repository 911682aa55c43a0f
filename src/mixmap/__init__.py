"""mixmap: quantitative MRI parameter maps from a latent space shared by all voxels."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mixmap")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
