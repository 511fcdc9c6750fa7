"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine."""

from moeserve.server.app import create_app, run

__all__ = ["create_app", "run"]
