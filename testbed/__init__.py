"""pdtb: an emulation testbed for disaggregated LLM inference."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pdtb")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+src"


def __getattr__(name: str):
    """``from testbed import Testbed`` without importing the runner on every ``pdtb`` start."""
    if name == "Testbed":
        from testbed.api import Testbed

        return Testbed
    raise AttributeError(f"module 'testbed' has no attribute {name!r}")
