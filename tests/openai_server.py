"""One server on a tiny random model (2048-token context), shared by the structured-output, tool-calling and
embedding tests: started on first use, stopped when the test process exits."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from moeserve.testing import ModelSpec, write_model
from tests.test_server import MODEL, Server

__all__ = ["MODEL", "shared_server", "model_path"]

_state: dict[str, object] = {}


def model_path() -> Path:
    if "path" not in _state:
        tmp = tempfile.mkdtemp(prefix="moeserve-guided-")
        atexit.register(shutil.rmtree, tmp, True)
        _state["path"] = write_model(Path(tmp) / "tiny.gguf", ModelSpec(context_length=2048, seed=5))
    return _state["path"]  # type: ignore[return-value]


def shared_server() -> Server:
    if "server" not in _state:
        server = Server(model_path(), "--max-model-len", "2048")
        atexit.register(server.stop)
        server.wait_ready()
        _state["server"] = server
    return _state["server"]  # type: ignore[return-value]
