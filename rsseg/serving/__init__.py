"""Serving with Triton Inference Server: the `tritonserver` command and a test/benchmark harness."""

from rsseg.errors import TritonNotInstalled, TritonServerError
from rsseg.serving.server import TritonServer, main, server_command

__all__ = ["TritonNotInstalled", "TritonServer", "TritonServerError", "main", "server_command"]
