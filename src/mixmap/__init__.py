"""mixmap: quantitative MRI parameter maps from a latent space shared by all voxels."""

from mixmap._version import __version__

#: The Python API (:mod:`mixmap.api`), imported on first use so that ``import mixmap`` stays
#: light: ``mixmap.fit``, ``mixmap.apply``, ``mixmap.load_model``, ``mixmap.Fit``.
_API = ("Fit", "apply", "fit", "load_model", "load_scan")


def __getattr__(name: str):
    if name in _API:
        from mixmap import api

        return getattr(api, name)
    raise AttributeError(f"module 'mixmap' has no attribute {name!r}")


__all__ = ["__version__", *_API]
