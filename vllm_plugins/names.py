"""The names `mergekit-rlvr serve` and the vLLM plugins agree on, defined once (this
module imports nothing: the CLI and every vLLM process read it cheaply)."""

#: the ``vllm.general_plugins`` / ``vllm.endpoint_plugins`` entry-point name (``VLLM_PLUGINS``)
PLUGIN_NAME = "mergekit_rlvr"
#: vLLM's ``--worker-extension-cls``: the worker side of hot swapping
WORKER_EXTENSION = "vllm_plugins.worker.HotSwapWorkerExtension"
#: the recipe `serve` starts the server on (an absolute path)
RECIPE_ENV = "MERGEKIT_RLVR_SERVE_RECIPE"
#: JSON {model string as written: local directory}: the server's workers read the
#: snapshots `serve` resolved (and started vLLM on), not a fresh resolution
MODELS_ENV = "MERGEKIT_RLVR_SERVE_MODELS"
#: serve's pre-pass result (``Decomposition.prepared_state()``: dots' thresholds and norms),
#: zlib + base64 (:func:`vllm_plugins.spec.encode_prepared`), so the server's workers do not
#: read every checkpoint again for it
PREPARED_ENV = "MERGEKIT_RLVR_SERVE_PREPARED"
