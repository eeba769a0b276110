"""pymemory: stream text from a local GGUF model for as long as you want, at bounded memory."""
from __future__ import annotations

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _error_names

__version__ = "0.1.0"
__all__ = list(_error_names)
