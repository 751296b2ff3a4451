"""Serving with Triton Inference Server: the `tritonserver` command and a test/benchmark harness."""

from rsseg.serving.server import (
    TritonNotInstalled,
    TritonServer,
    TritonServerError,
    main,
    server_command,
)

__all__ = ["TritonNotInstalled", "TritonServer", "TritonServerError", "main", "server_command"]
