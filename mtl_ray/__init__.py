"""mtl-ray: distributed meta-learning on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mtl-ray")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
