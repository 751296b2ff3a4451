"""A served ensemble as a tile predictor: spec from the server, tiles spread over several servers,
a bounded number of requests in flight, retries with backoff, optional system shared memory."""

from __future__ import annotations

import itertools
import logging
import os
import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rsseg import contract
from rsseg.client.leftovers import remove_stale_shared_memory
from rsseg.contract import TTA_MODES
from rsseg.errors import InferenceFailed, ServerUnavailable, UserError, first_line
from rsseg.spec import ModelSpec

log = logging.getLogger(__name__)

SHARED_MEMORY = ("none", "system")
OUTPUT_DTYPES = {name: np.dtype(dtype) for name, (_, dtype) in contract.OUTPUT_TYPES.items()}


class TritonSegmenter:
    """Class maps (and/or probabilities) for batches of raw tiles from one served ensemble.

    `urls` may name several servers serving the same repository: requests go round-robin, and a failed
    request is retried on the next one. Up to `max_in_flight` requests may run at once, from as many
    threads: each takes a slot with its own clients (the HTTP client is not thread-safe) and, with
    `shared_memory="system"`, its own input and output regions registered with every server (servers on
    this host only; tiles and results then skip the socket).
    `tta` ("none", "flips", "d4") is sent with every request; None leaves the server's configured default.
    """

    def __init__(self, urls: Sequence[str], model: str | None = None, *, protocol: str = "grpc",
                 max_in_flight: int = 4, retries: int = 3, backoff: float = 0.5, timeout: float = 600.0,
                 tta: str | None = None, shared_memory: str = "none") -> None:
        if protocol not in ("grpc", "http"):
            raise UserError(f"protocol must be grpc or http, got {protocol!r}")
        if shared_memory not in SHARED_MEMORY:
            raise UserError(f"shared memory must be one of {', '.join(SHARED_MEMORY)}, got {shared_memory!r}")
        if tta is not None and tta not in TTA_MODES:
            raise UserError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
        self.urls, self.protocol, self.tta = list(urls), protocol, tta
        self.max_in_flight, self.retries, self.backoff, self.timeout = max_in_flight, retries, backoff, timeout
        self._module = _client_module(protocol)
        probe = self._connect(self.urls[0], bootstrap=True)
        try:
            self.model = model or _the_served_model(probe, self.urls[0], protocol)
            raw = served_spec_dict(probe, self.model, self.urls[0], protocol)
        finally:
            probe.close()
        self.served = raw
        self.spec = ModelSpec.from_dict({k: v for k, v in raw.items() if k != "triton"})
        self.max_message_bytes = int(raw["triton"]["max_message_bytes"])
        self.max_batch_size = int(raw["triton"]["max_batch_size"])
        self._next = itertools.count()
        self._free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self._slots: list[_Slot] = []
        self._shm_prefix = f"rsseg-{os.getpid()}-{id(self):x}-"
        if shared_memory == "system":
            remove_stale_shared_memory()  # regions of clients that were killed
        try:
            for i in range(max(1, max_in_flight)):
                slot = _Slot([self._connect(url) for url in self.urls],
                             _SharedMemory(self, i) if shared_memory == "system" else None)
                self._slots.append(slot)
                self._free.put(slot)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for slot in self._slots:
            if slot.shm is not None:
                slot.shm.close(slot.clients)
            for client in slot.clients:
                client.close()
        if any(slot.shm is not None for slot in self._slots):
            remove_stale_shared_memory(self._shm_prefix)  # one created when a stop signal cut in
        self._slots = []

    def __enter__(self) -> TritonSegmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, tiles: np.ndarray, outputs: Sequence[str] = (contract.CLASS_MAP,)
                 ) -> np.ndarray | tuple[np.ndarray, ...]:
        """`outputs` for a batch of raw tiles [N, H, W, C], retried with backoff: one array, or a tuple in
        the order asked. Thread-safe."""
        result = self._with_slot(tiles, outputs, retries=self.retries)
        return result[outputs[0]] if len(outputs) == 1 else tuple(result[n] for n in outputs)

    def infer(self, tiles: np.ndarray, outputs: Sequence[str] = (contract.CLASS_MAP,), tta: str | None = None
              ) -> dict[str, np.ndarray]:
        """One request (no retries) asking for any of CLASS_MAP/PROBABILITIES, optionally with TTA."""
        return self._with_slot(tiles, outputs, retries=0, tta=tta)

    def _with_slot(self, tiles: np.ndarray, outputs: Sequence[str], *, retries: int, tta: str | None = None
                   ) -> dict[str, np.ndarray]:
        slot = self._free.get()
        try:
            return self._infer_with_retries(slot, next(self._next), tiles, outputs, retries, tta or self.tta)
        finally:
            self._free.put(slot)

    def _infer_with_retries(self, slot: _Slot, index: int, tiles: np.ndarray, outputs: Sequence[str],
                            retries: int, tta: str | None) -> dict[str, np.ndarray]:
        error: Exception | None = None
        for attempt in range(retries + 1):
            # After a failure the next server takes the retry (the same one when there is only one).
            server = (index + attempt) % len(self.urls)
            try:
                return self._request(slot, server, tiles, outputs, tta)
            except Exception as exc:  # noqa: BLE001 - tritonclient raises several types; all are retried
                error = exc
                if attempt < retries:
                    delay = self.backoff * 2**attempt
                    log.warning("request to %s failed (%s); retrying in %.1f s", self.urls[server],
                                first_line(exc), delay)
                    time.sleep(delay)
        if retries == 0:
            raise error  # type: ignore[misc]
        raise InferenceFailed(f"{self.model} at {', '.join(self.urls)}: a request failed {retries + 1} times "
                              f"({first_line(error)})")

    def _request(self, slot: _Slot, server: int, tiles: np.ndarray, outputs: Sequence[str], tta: str | None
                 ) -> dict[str, np.ndarray]:
        m, client = self._module, slot.clients[server]
        tiles = np.ascontiguousarray(tiles)
        tensor = m.InferInput(contract.TILES, list(tiles.shape), contract.wire_type(str(tiles.dtype)))
        requested = [m.InferRequestedOutput(n) for n in outputs]
        placed: dict[str, tuple[int, int]] = {}
        if slot.shm is not None:
            placed = slot.shm.place(slot.clients, tiles, tensor, requested, self._output_sizes(tiles, outputs))
        else:
            tensor.set_data_from_numpy(tiles)
        kwargs: dict[str, Any] = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        if tta:
            kwargs["parameters"] = {"tta": tta}
        result = client.infer(self.model, [tensor], outputs=requested, **kwargs)
        if slot.shm is None:
            return {n: result.as_numpy(n) for n in outputs}
        return {n: slot.shm.read(n, _output_shape(result, n), *placed[n]) for n in outputs}

    def _output_sizes(self, tiles: np.ndarray, outputs: Sequence[str]) -> dict[str, int]:
        n, h, w = tiles.shape[:3]
        channels = {contract.CLASS_MAP: len(self.spec.outputs), contract.PROBABILITIES: self.spec.num_output_channels}
        return {name: n * channels[name] * h * w * OUTPUT_DTYPES[name].itemsize for name in outputs}

    def _connect(self, url: str, bootstrap: bool = False) -> Any:
        """A client for `url`, retried with backoff while the server does not answer."""
        for attempt in range(self.retries + 1):
            try:
                client = make_client(self._module, self.protocol, url,
                                      contract.BOOTSTRAP_MESSAGE_BYTES if bootstrap else self.max_message_bytes)
                if client.is_server_ready():
                    return client
                client.close()
            except Exception as exc:  # noqa: BLE001 - connection refused surfaces as several types
                log.debug("server %s: %s", url, first_line(exc))
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise ServerUnavailable(f"no Triton server ready at {url} after {self.retries + 1} tries; start one with "
                                "`tritonserver --model-repository triton_repo` or pass --url")


@dataclass
class _Slot:
    """What one request in flight uses exclusively: a client per server, shared-memory regions."""

    clients: list[Any]
    shm: _SharedMemory | None


class _SharedMemory:
    """A slot's system shared-memory regions (input, outputs), registered with every server by name.

    Regions grow (unregister, recreate, register) when a larger batch or tile arrives; results are
    copied out before the slot is released, so the next request may overwrite them.
    """

    def __init__(self, owner: TritonSegmenter, index: int) -> None:
        self.owner = owner
        self.prefix = f"{owner._shm_prefix}{index}"  # names rsseg.client.leftovers recognises
        self.regions: dict[str, tuple[Any, int]] = {}  # "input"/"output" -> (handle, byte size)

    def _region(self, clients: list[Any], kind: str, nbytes: int) -> tuple[str, Any]:
        from tritonclient.utils import shared_memory as shm

        name = f"{self.prefix}-{kind}"
        handle, size = self.regions.get(kind, (None, 0))
        if nbytes > size:
            if handle is not None:
                self._drop(clients, kind)
            handle = shm.create_shared_memory_region(name, f"/{name}", nbytes)
            self.regions[kind] = (handle, nbytes)
            for url, client in zip(self.owner.urls, clients, strict=True):
                try:
                    client.register_system_shared_memory(name, f"/{name}", nbytes)
                except Exception as exc:  # noqa: BLE001
                    raise UserError(f"{url}: cannot register system shared memory ({first_line(exc)}); "
                                    "--shared-memory system needs the server on this host") from None
        return name, handle

    def place(self, clients: list[Any], tiles: np.ndarray, tensor: Any, requested: list[Any],
              output_sizes: dict[str, int]) -> dict[str, tuple[int, int]]:
        """Put the tiles in the input region, point `tensor` and `requested` at the regions; returns each
        output's (offset, byte size) in the output region."""
        from tritonclient.utils import shared_memory as shm

        name, handle = self._region(clients, "input", tiles.nbytes)
        shm.set_shared_memory_region(handle, [tiles])
        tensor.set_shared_memory(name, tiles.nbytes)
        out_name, _ = self._region(clients, "output", sum(output_sizes.values()))
        placed, offset = {}, 0
        for output in requested:
            size = output_sizes[output.name()]
            output.set_shared_memory(out_name, size, offset=offset)
            placed[output.name()] = (offset, size)
            offset += size
        return placed

    def read(self, output: str, shape: list[int], offset: int, size: int) -> np.ndarray:
        from tritonclient.utils import shared_memory as shm

        dtype = OUTPUT_DTYPES[output]
        if int(np.prod(shape)) * dtype.itemsize != size:
            raise InferenceFailed(f"{self.owner.model}: output {output} has shape {shape}, not the {size} bytes "
                                  "placed for it")
        return shm.get_contents_as_numpy(self.regions["output"][0], dtype, shape, offset=offset).copy()

    def _drop(self, clients: list[Any], kind: str) -> None:
        from tritonclient.utils import shared_memory as shm

        handle, _ = self.regions.pop(kind)
        for client in clients:
            try:
                client.unregister_system_shared_memory(f"{self.prefix}-{kind}")
            except Exception as exc:  # noqa: BLE001 - a server that went away has forgotten it anyway
                log.debug("unregistering %s: %s", kind, first_line(exc))
        shm.destroy_shared_memory_region(handle)

    def close(self, clients: list[Any]) -> None:
        for kind in list(self.regions):
            self._drop(clients, kind)


def _output_shape(result: Any, name: str) -> list[int]:
    output = result.get_output(name)
    return [int(d) for d in (output["shape"] if isinstance(output, dict) else output.shape)]


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


def _the_served_model(client: Any, url: str, protocol: str = "grpc") -> str:
    """The one promoted ensemble a server serves (NAME, not NAME-files or the steps)."""
    if protocol == "grpc":
        models = client.get_model_repository_index(as_json=True).get("models", [])
    else:  # HTTP answers the list itself
        models = client.get_model_repository_index()
    names = sorted(m["name"] for m in models if m.get("state", "READY") == "READY")
    roots = [n for n in names if not contract.is_step(n)]
    if len(roots) != 1:
        raise UserError(f"{url} serves {len(roots)} models ({', '.join(roots) or 'none'}); choose one with --model")
    return roots[0]


def served_spec_dict(client: Any, model: str, url: str = "", protocol: str = "grpc") -> dict[str, Any]:
    import json

    try:
        config = client.get_model_config(model, as_json=True) if protocol == "grpc" else client.get_model_config(model)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{url}: model {model!r} is not served ({first_line(exc)})") from None
    config = config.get("config", config)
    try:
        return json.loads(config["parameters"]["model_spec"]["string_value"])
    except KeyError:
        raise UserError(f"{url}: model {model!r} carries no model spec; promote it with rsseg") from None

