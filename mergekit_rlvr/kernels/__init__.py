"""Thin mergekit adapters over ``mergekit_rlvr.methods``.

``register_all`` is called by the import hook in ``mergekit_rlvr._autoload`` when
mergekit's merge-method registry loads; calling it again is harmless.
"""

from __future__ import annotations

import sys

_registered = False


def methods():
    from mergekit_rlvr.kernels.dots import dots_merge
    from mergekit_rlvr.kernels.reasoning_interp import reasoning_interp_merge
    from mergekit_rlvr.kernels.sar import sar_merge

    return (dots_merge, sar_merge, reasoning_interp_merge)


def register_all() -> None:
    global _registered
    from mergekit.merge_methods import registry

    for method in methods():
        if method.spec.name not in {m.spec.name for m in registry.registered_methods()}:
            registry.register(method)
    if not _registered:
        _install_excepthook()
    _registered = True


def _unreadable_file(value, traceback):
    """The checkpoint file a safetensors/OS error was raised for, if a frame names it."""
    if not (isinstance(value, OSError) or type(value).__name__ == "SafetensorError"):
        return None
    path = None
    while traceback is not None:
        for key in ("file_path", "filename", "path"):
            candidate = traceback.tb_frame.f_locals.get(key)
            if isinstance(candidate, str):
                path = candidate
                break
        traceback = traceback.tb_next
    return path


def _install_excepthook() -> None:
    """Errors in a merge that uses our methods end the command with one line naming
    the model, tensor, parameter or file, not a traceback (MERGEKIT_RLVR_DEBUG=1
    restores the traceback). Other merges keep mergekit's behaviour, except that an
    unreadable checkpoint file is named."""
    import os

    from mergekit_rlvr.kernels.base import in_use
    from mergekit_rlvr.methods.common import MergeInputError

    previous = sys.excepthook

    def hook(kind, value, traceback):
        if not os.environ.get("MERGEKIT_RLVR_DEBUG"):
            path = _unreadable_file(value, traceback)
            if path is not None:
                sys.stderr.write(f"error: cannot read {path}: {value}\n")
                return
            if isinstance(value, MergeInputError):
                sys.stderr.write(f"error: {value}\n")
                return
            if type(value).__name__ == "ValidationError" and hasattr(value, "errors") and in_use():
                # a parameter that failed our validators at planning time
                message = value.errors()[0].get("msg", str(value)).removeprefix("Value error, ")
                sys.stderr.write(f"error: {message}\n")
                return
            if in_use() and not isinstance(value, KeyboardInterrupt):
                sys.stderr.write(f"error: {type(value).__name__}: {value}\n")
                return
        previous(kind, value, traceback)

    sys.excepthook = hook
