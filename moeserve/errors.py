"""Exceptions shared by every layer of moeserve.

One exception type per kind of problem, each carrying a message that names the file, the tensor
or key, what was expected and what was found — so a user sees one clear line, never a traceback
from deep inside numpy or torch.
"""

from __future__ import annotations


class MoeServeError(Exception):
    """Base class: every error moeserve raises on purpose derives from this."""


class GGUFError(MoeServeError, ValueError):
    """A GGUF file cannot be used: unknown architecture, missing/ill-shaped tensor, bad key, truncation."""


class UnsupportedQuantError(GGUFError):
    """A tensor uses a quantization type moeserve has no kernel for."""


class RequestError(MoeServeError, ValueError):
    """A request parameter is invalid (negative max_tokens, prompt longer than the context, ...)."""


class NativeBuildError(MoeServeError, RuntimeError):
    """The native CPU kernels cannot be built or loaded: a compiler error (the message holds the compiler's
    command and output), no compiler, or a CPU without the instructions they need."""
