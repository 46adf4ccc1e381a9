"""llminstr: record the internal activations of PyTorch language models, and analyse them."""

from llminstr.config import HookGranularity, InstrumentationConfig
from llminstr.errors import LlminstrError

__version__ = "0.1.0"

__all__ = [
    "HookGranularity",
    "InstrumentationConfig",
    "LlminstrError",
    "__version__",
]
