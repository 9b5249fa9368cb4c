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


def _install_excepthook() -> None:
    """Our input errors end a command with one line, not a traceback."""
    from mergekit_rlvr.methods.common import MergeInputError

    previous = sys.excepthook

    def hook(kind, value, traceback):
        if isinstance(value, MergeInputError):
            sys.stderr.write(f"error: {value}\n")
            return
        previous(kind, value, traceback)

    sys.excepthook = hook
