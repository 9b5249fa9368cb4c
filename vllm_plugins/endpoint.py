"""vLLM endpoint plugin: ``GET/POST /v1/merge`` on the OpenAI-compatible server.

Registered under the ``vllm.endpoint_plugins`` entry-point group as
``mergekit_rlvr``; vLLM loads it only when ``VLLM_PLUGINS`` names it (``mergekit-rlvr
serve`` sets that). The engine side is the worker extension
``vllm_plugins.worker.HotSwapWorkerExtension`` (``--worker-extension-cls``), reached
through ``collective_rpc``.

- ``GET /v1/merge`` -> ``{"method", "coefficients": {name: value}, "version": n}``
- ``POST /v1/merge`` ``{"coefficients": {name: value} | [values], "drain": true,
  "timeout": s}`` -> the new state. Bad coefficients: 400, weights unchanged.

The route lives under ``/v1``, so vLLM's ``--api-key`` middleware guards it. Every
model request's response carries ``x-merge-version``: the version whose weights
produced all of it (see ``serving_gate``). At start-up the recipe named by
``$MERGEKIT_RLVR_SERVE_RECIPE`` is loaded into the workers and its coefficients
applied (version 0) before the server accepts requests.
"""

from __future__ import annotations

import json
import logging
import os

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .names import MODELS_ENV, PLUGIN_NAME, PREPARED_ENV, RECIPE_ENV
from .serving_gate import AdmissionGate, MergeVersionMiddleware
from .serving_merge import MergeController, MergeRequestError

logger = logging.getLogger("vllm.mergekit_rlvr.endpoint")

ROUTE = "/v1/merge"


def _error(status: int, message: str) -> JSONResponse:
    kind = {400: "BadRequestError", 404: "NotFoundError", 409: "ConflictError",
            503: "ServiceUnavailableError"}.get(status, "InternalServerError")
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": kind, "param": None, "code": status}},
    )


class MergeEndpointPlugin:
    """The `EndpointPlugin` (vllm/plugins/endpoint_plugins/interface.py)."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def __init__(self):
        self.gate = AdmissionGate()
        self.controller: MergeController | None = None

    # Phase A: routes and middleware, while the app is being built.
    def attach_router(self, app) -> None:
        router = APIRouter()
        plugin = self

        @router.get(ROUTE)
        async def get_merge(raw_request: Request):
            controller = plugin.controller
            if controller is None or not controller.loaded:
                return _error(409, "no merge recipe is loaded; start the server with `mergekit-rlvr serve recipe.yml`")
            return controller.describe()

        @router.post(ROUTE)
        async def post_merge(raw_request: Request):
            if plugin.controller is None:
                return _error(409, "the merge plugin has no engine")
            try:
                body = json.loads(await raw_request.body() or b"null")
            except (ValueError, UnicodeDecodeError) as error:
                return _error(400, f"body is not valid JSON: {error}")
            try:
                return await plugin.controller.swap(body)
            except MergeRequestError as error:
                return _error(error.status, error.message)

        app.include_router(router)
        # Outermost at this point; vLLM's auth middleware is added later and so wraps it.
        app.add_middleware(MergeVersionMiddleware, gate=self.gate)

    # Phase B: state, with the engine up and before the server listens.
    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:
            logger.warning("mergekit_rlvr: no engine (render-only server); /v1/merge is inert")
            return
        self.controller = MergeController(engine_client, self.gate)
        state.mergekit_rlvr = self.controller
        recipe = os.environ.get(RECIPE_ENV)
        if recipe:
            from vllm_plugins.spec import decode_prepared, load_spec

            models = json.loads(os.environ.get(MODELS_ENV) or "{}")
            spec = load_spec(recipe, models=models, prepared=decode_prepared(os.environ.get(PREPARED_ENV)),
                             trust_remote_code=bool(getattr(args, "trust_remote_code", False)))
            await self.controller.load(spec, recipe=recipe)
        elif not await self.controller.attach():
            logger.warning("mergekit_rlvr: %s is not set; /v1/merge reports no merge", RECIPE_ENV)


def register() -> MergeEndpointPlugin:
    """Entry point (``vllm.endpoint_plugins``): a zero-argument plugin factory."""
    return MergeEndpointPlugin()
