"""The live merge behind ``/v1/merge``: what is loaded, and how a swap happens.

A swap, serialized by a lock:
  1. validate the request (names, finite numbers) - a 400 changes nothing;
  2. close the admission gate (``serving_gate``): new requests wait at the door,
     admitted ones finish (``drain``) or are aborted (``"drain": false``);
  3. pause the engine's scheduler (``pause_generation``; ``wait`` or ``abort`` mode,
     which also clears the KV/prefix caches), so nothing else runs on the weights;
  4. ``hotswap_set`` on every worker of every data-parallel replica
     (:func:`rpc_every_replica`), which must all report the same new worker version;
     reset the prefix cache; tag the engine's outputs with the new version (``update_weight_version``,
     reported per token by ``/inference/v1/generate``);
  5. resume the engine, reopen the gate under the new version.
Under ``--data-parallel-size N`` the one API server holds the gate for all N
replicas and vLLM's engine client pauses and resumes all of them, so no request
runs on a replica still holding the old weights.
Input is validated here first (names, finite numbers, ranges), so the workers see
only valid coefficients; a worker failure is reported as a 500 and the version is
not bumped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from .serving_gate import AdmissionGate

logger = logging.getLogger("vllm.mergekit_rlvr.serving")

#: Default seconds a draining swap waits for in-flight requests.
DRAIN_TIMEOUT = 600.0
#: Seconds an aborting swap waits for aborted requests to unwind.
ABORT_TIMEOUT = 30.0


class MergeRequestError(Exception):
    """A request to the merge route that cannot be honoured: HTTP status + message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def first_result(results):
    """collective_rpc returns one result per worker (tensor-parallel ranks); they
    must agree on the merge."""
    if not isinstance(results, list):
        return results
    if not results:
        raise RuntimeError("collective_rpc returned no worker result")
    states = [parse_state(r) for r in results if isinstance(r, dict) and "coefficients" in r]
    if any(state != states[0] for state in states[1:]):
        raise RuntimeError(f"workers disagree on the merge: {states}")
    return results[0]


async def rpc_every_replica(engine_client, method: str, args: tuple = ()) -> list:
    """One result per worker of every engine (data-parallel replica, then its ranks).

    Under data parallelism vLLM's ``collective_rpc`` reaches every engine but returns
    engine 0's results only; its core client's ``call_utility_all_async`` (vLLM
    0.32) returns each engine's, so a replica that did not swap cannot go unseen.
    A vLLM without it gets ``collective_rpc``, which still reaches every engine."""
    from .vllm_compat import call_every_engine

    call_all = call_every_engine(engine_client)
    if call_all is None:
        return await engine_client.collective_rpc(method, args=args)
    per_engine = await call_all("collective_rpc", method, None, args, None)
    return [result for results in per_engine for result in (results if isinstance(results, list) else [results])]


def same_version(reports: list) -> int | None:
    """The worker version every ``hotswap_set`` reply reports (they must agree)."""
    versions = {r.get("version") for r in reports if isinstance(r, dict)}
    if len(versions) > 1:
        raise RuntimeError(f"workers report different merge versions after a swap: {sorted(versions)}")
    return next(iter(versions), None)


def parse_state(state: dict) -> tuple[str, list[str], list[float]]:
    """(method, names, values) from a worker's hotswap_load/hotswap_state answer."""
    method = state.get("method")
    coefficients = state.get("coefficients")
    if isinstance(coefficients, dict):
        names = list(coefficients)
        values = [float(coefficients[name]) for name in names]
    else:
        names = list(state.get("names") or [])
        values = [float(v) for v in (coefficients or [])]
        if len(names) != len(values):
            raise RuntimeError(f"worker reported {len(names)} names but {len(values)} coefficients")
    return method, names, values


def parse_swap_request(body, names: list[str], current: list[float]) -> tuple[list[float], bool, float | None]:
    """Validate a POST body; return (all values in recipe order, drain, timeout).

    ``coefficients`` is either ``{name: value}`` (names not given keep their current
    value) or a list of all values in recipe order.
    """
    if not isinstance(body, dict):
        raise MergeRequestError(400, 'body must be a JSON object like {"coefficients": {...}}')
    unknown = sorted(set(body) - {"coefficients", "drain", "timeout"})
    if unknown:
        raise MergeRequestError(400, f"unknown field(s) {unknown}; expected coefficients, drain, timeout")
    if "coefficients" not in body:
        raise MergeRequestError(400, 'missing field "coefficients"')
    drain = body.get("drain", True)
    if not isinstance(drain, bool):
        raise MergeRequestError(400, f'"drain" must be true or false, got {drain!r}')
    timeout = body.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
    ):
        raise MergeRequestError(400, f'"timeout" must be a positive number of seconds, got {timeout!r}')

    given = body["coefficients"]
    values = list(current)
    if isinstance(given, dict):
        if not given:
            raise MergeRequestError(400, '"coefficients" is empty')
        for name, value in given.items():
            if name not in names:
                raise MergeRequestError(400, f"unknown coefficient {name!r}; this merge has {names}")
            values[names.index(name)] = _number(name, value)
    elif isinstance(given, list):
        if len(given) != len(names):
            raise MergeRequestError(
                400, f'"coefficients" list has {len(given)} values; this merge has {len(names)}: {names}'
            )
        values = [_number(name, value) for name, value in zip(names, given)]
    else:
        raise MergeRequestError(400, '"coefficients" must be an object {name: value} or a list of numbers')
    return values, drain, (float(timeout) if timeout is not None else None)


def check_method_values(method: str | None, names: list[str], values: list[float]) -> None:
    """The hot swap's one coefficient validator (float32 range, method ranges)."""
    from vllm_plugins.rpc import check_values

    try:
        check_values(method, names, values)
    except ValueError as error:
        raise MergeRequestError(400, str(error)) from None


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MergeRequestError(400, f"coefficient {name!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise MergeRequestError(400, f"coefficient {name!r} must be finite, got {value!r}")
    return value


def _worker_error(error: BaseException) -> str:
    """The last line of a worker's error (collective_rpc wraps the remote traceback)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


class MergeController:
    """Holds the served merge's state in the API server process and performs swaps."""

    def __init__(self, engine_client, gate: AdmissionGate):
        self.engine = engine_client
        self.gate = gate
        self.method: str | None = None
        self.names: list[str] = []
        self.values: list[float] = []
        self.version = gate.version
        self.recipe: str | None = None
        self.workers = 0  # every worker of every data-parallel replica
        self._lock = asyncio.Lock()

    @property
    def loaded(self) -> bool:
        return self.method is not None

    def describe(self) -> dict:
        return {
            "method": self.method,
            "coefficients": dict(zip(self.names, self.values)),
            "version": self.version,
        }

    async def load(self, spec: dict, recipe: str | None = None) -> dict:
        """Load a recipe into every worker (applies its coefficients) as version 0."""
        started = time.perf_counter()
        results = await rpc_every_replica(self.engine, "hotswap_load", (spec,))
        state = first_result(results)
        self.method, self.names, self.values = parse_state(state)
        self.workers = len(results) if isinstance(results, list) else 1
        self.recipe = recipe
        await self.engine.reset_prefix_cache()
        await self.engine.update_weight_version(str(self.version))
        logger.info(
            "mergekit_rlvr: serving %s merge %s (version %d) loaded on %d workers in %.2f s",
            self.method, self.describe()["coefficients"], self.version, self.workers, time.perf_counter() - started,
        )
        return state

    async def attach(self) -> bool:
        """Adopt a merge already loaded in the workers (no recipe given to the server)."""
        try:
            state = first_result(await rpc_every_replica(self.engine, "hotswap_state"))
        except Exception as error:  # no worker extension, or nothing loaded yet
            logger.warning("mergekit_rlvr: no hot-swap state in the workers (%s)", _worker_error(error))
            return False
        if not state or not state.get("coefficients"):
            return False
        self.method, self.names, self.values = parse_state(state)
        await self.engine.update_weight_version(str(self.version))
        return True

    async def swap(self, body) -> dict:
        if not self.loaded:
            raise MergeRequestError(
                409, "no merge recipe is loaded; start the server with `mergekit-rlvr serve recipe.yml`"
            )
        async with self._lock:
            values, drain, timeout = parse_swap_request(body, self.names, self.values)
            check_method_values(self.method, self.names, values)
            if timeout is None:
                timeout = DRAIN_TIMEOUT if drain else ABORT_TIMEOUT
            new_version = self.version + 1
            reason = f"merge coefficients swapped to version {new_version} with drain=false"
            started = time.perf_counter()
            try:
                async with self.gate.closed(drain=drain, timeout=timeout, reason=reason):
                    waited = time.perf_counter() - started
                    await self.engine.pause_generation(mode="wait" if drain else "abort", clear_cache=True)
                    try:
                        try:
                            reports = await rpc_every_replica(self.engine, "hotswap_set", (values,))
                            same_version(reports)
                            if self.workers and len(reports) != self.workers:
                                raise RuntimeError(f"{len(reports)} of {self.workers} workers answered the swap")
                        except Exception as error:
                            # Input was validated above, so this is unexpected: report it
                            # (one line) and log what the workers now hold.
                            await self._resync()
                            raise MergeRequestError(
                                500, f"swap failed in the workers: {_worker_error(error)}"
                            ) from error
                        await self.engine.reset_prefix_cache()
                        await self.engine.update_weight_version(str(new_version))
                        self.values = values
                        self.version = new_version
                        self.gate.version = new_version
                    finally:
                        await self.engine.resume_generation()
            except TimeoutError as error:
                raise MergeRequestError(503, f"swap not done, weights unchanged: {error}") from None
            total = time.perf_counter() - started
            logger.info(
                "mergekit_rlvr: merge version %d %s (drain=%s, waited %.3f s for requests, swap %.3f s)",
                self.version, self.describe()["coefficients"], drain, waited, total - waited,
            )
            worker = max((r.get("seconds", 0.0) for r in reports if isinstance(r, dict)), default=None)
            return {**self.describe(), "drained": drain, "seconds": round(total, 6),
                    "waited_seconds": round(waited, 6),
                    "worker_seconds": None if worker is None else round(worker, 6)}

    async def _resync(self) -> None:
        try:
            state = first_result(await rpc_every_replica(self.engine, "hotswap_state"))
            _, _, values = parse_state(state)
            if values != self.values:
                logger.error("mergekit_rlvr: workers report %s after a rejected swap, expected %s",
                             values, self.values)
        except Exception:
            logger.exception("mergekit_rlvr: could not read the workers' state after a rejected swap")
