"""A served ensemble as a tile predictor: spec from the server, tiles spread over several servers,
a bounded number of requests in flight, retries with backoff, results in order."""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from rsseg.errors import UserError
from rsseg.spec import ModelSpec

log = logging.getLogger(__name__)

TRITON_DTYPES = {"uint8": "UINT8", "uint16": "UINT16"}


class ServerUnavailable(UserError):
    """No server answered at a URL after the retries."""


class InferenceFailed(UserError):
    """A request kept failing after the retries."""


class TritonSegmenter:
    """Class maps (or probabilities) for batches of raw tiles from one served ensemble.

    `urls` may name several servers serving the same repository: requests go round-robin. At most
    `max_in_flight` requests are outstanding at any time, so client memory does not grow with the scene.
    """

    def __init__(self, urls: Sequence[str], model: str | None = None, *, protocol: str = "grpc",
                 max_in_flight: int = 4, retries: int = 3, backoff: float = 0.5, timeout: float = 600.0) -> None:
        if protocol not in ("grpc", "http"):
            raise UserError(f"protocol must be grpc or http, got {protocol!r}")
        self.urls, self.protocol = list(urls), protocol
        self.max_in_flight, self.retries, self.backoff, self.timeout = max_in_flight, retries, backoff, timeout
        self._module = _client_module(protocol)
        probe = self._connect(self.urls[0], bootstrap=True)
        try:
            self.model = model or _the_served_model(probe, self.urls[0])
            raw = served_spec_dict(probe, self.model, self.urls[0], protocol)
        finally:
            probe.close()
        self.served = raw
        self.spec = ModelSpec.from_dict({k: v for k, v in raw.items() if k != "triton"})
        self.max_message_bytes = int(raw["triton"]["max_message_bytes"])
        self.max_batch_size = int(raw["triton"]["max_batch_size"])
        self._clients = [self._connect(url) for url in self.urls]
        self._next = itertools.cycle(range(len(self._clients)))
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="triton")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for client in self._clients:
            client.close()

    def __enter__(self) -> TritonSegmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, tiles: np.ndarray, *, probabilities: bool = False) -> np.ndarray:
        return self._infer_with_retries(next(self._next), tiles, probabilities)

    def infer(self, tiles: np.ndarray, outputs: Sequence[str] = ("CLASS_MAP",), tta: str | None = None
              ) -> dict[str, np.ndarray]:
        """One request (no retries) asking for any of CLASS_MAP/PROBABILITIES, optionally with TTA."""
        return self._request(self._clients[next(self._next)], tiles, outputs, tta)

    def map(self, batches: Iterable[np.ndarray], *, probabilities: bool = False) -> Iterator[np.ndarray]:
        """Results in input order, with at most `max_in_flight` requests outstanding. The input iterator
        is advanced while earlier requests run, so reading, inference and writing overlap."""
        pending: deque[Future] = deque()
        for batch in batches:
            if len(pending) >= self.max_in_flight:
                yield pending.popleft().result()
            pending.append(self._pool.submit(self._infer_with_retries, next(self._next), batch, probabilities))
        while pending:
            yield pending.popleft().result()

    def _infer_with_retries(self, index: int, tiles: np.ndarray, probabilities: bool) -> np.ndarray:
        error: Exception | None = None
        for attempt in range(self.retries + 1):
            # After a failure the next server takes the retry (the same one when there is only one).
            client_index = (index + attempt) % len(self._clients)
            try:
                return self._infer(self._clients[client_index], tiles, probabilities)
            except Exception as exc:  # noqa: BLE001 - tritonclient raises several types; all are retried
                error = exc
                if attempt < self.retries:
                    delay = self.backoff * 2**attempt
                    log.warning("request to %s failed (%s); retrying in %.1f s", self.urls[client_index],
                                _one_line(exc), delay)
                    time.sleep(delay)
        raise InferenceFailed(f"{self.model} at {', '.join(self.urls)}: a request failed {self.retries + 1} times "
                              f"({_one_line(error)})")

    def _infer(self, client: Any, tiles: np.ndarray, probabilities: bool) -> np.ndarray:
        name = "PROBABILITIES" if probabilities else "CLASS_MAP"
        return self._request(client, tiles, (name,), None)[name]

    def _request(self, client: Any, tiles: np.ndarray, outputs: Sequence[str], tta: str | None
                 ) -> dict[str, np.ndarray]:
        m = self._module
        tensor = m.InferInput("TILES", list(tiles.shape), TRITON_DTYPES[str(tiles.dtype)])
        tensor.set_data_from_numpy(np.ascontiguousarray(tiles))
        kwargs: dict[str, Any] = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        if tta:
            kwargs["parameters"] = {"tta": tta}
        result = client.infer(self.model, [tensor], outputs=[m.InferRequestedOutput(n) for n in outputs], **kwargs)
        return {n: result.as_numpy(n) for n in outputs}

    def _connect(self, url: str, bootstrap: bool = False) -> Any:
        """A client for `url`, retried with backoff while the server does not answer."""
        for attempt in range(self.retries + 1):
            try:
                client = make_client(self._module, self.protocol, url,
                                      64 << 20 if bootstrap else self.max_message_bytes)
                if client.is_server_ready():
                    return client
                client.close()
            except Exception as exc:  # noqa: BLE001 - connection refused surfaces as several types
                log.debug("server %s: %s", url, _one_line(exc))
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise ServerUnavailable(f"no Triton server ready at {url} after {self.retries + 1} tries; start one with "
                                "`tritonserver --model-repository triton_repo` or pass --url")


def _client_module(protocol: str) -> Any:
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


def make_client(module: Any, protocol: str, url: str, max_message_bytes: int) -> Any:
    if protocol == "grpc":
        # gRPC's default 4 MB limit bites on large tiles: raise it to what the server announces.
        return module.InferenceServerClient(url, channel_args=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ])
    return module.InferenceServerClient(url, connection_timeout=60.0, network_timeout=600.0)


def _the_served_model(client: Any, url: str) -> str:
    """The one promoted ensemble a server serves (NAME, not NAME-files or the steps)."""
    index = client.get_model_repository_index(as_json=True) if hasattr(client, "get_model_repository_index") else []
    models = index.get("models", []) if isinstance(index, dict) else index
    names = sorted(m["name"] for m in models if m.get("state", "READY") == "READY")
    roots = [n for n in names if not any(n.endswith(s) for s in ("-preprocess", "-segmenter", "-postprocess",
                                                                    "-decode", "-files"))]
    if len(roots) != 1:
        raise UserError(f"{url} serves {len(roots)} models ({', '.join(roots) or 'none'}); choose one with --model")
    return roots[0]


def served_spec_dict(client: Any, model: str, url: str = "", protocol: str = "grpc") -> dict[str, Any]:
    import json

    try:
        config = client.get_model_config(model, as_json=True) if protocol == "grpc" else client.get_model_config(model)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{url}: model {model!r} is not served ({_one_line(exc)})") from None
    config = config.get("config", config)
    try:
        return json.loads(config["parameters"]["model_spec"]["string_value"])
    except KeyError:
        raise UserError(f"{url}: model {model!r} carries no model spec; promote it with rsseg") from None


def _one_line(exc: object) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
