"""Register our merge methods with mergekit the moment mergekit loads them.

mergekit has no plugin entry point, so a ``.pth`` file imports this module at
interpreter start. It only puts a tiny finder on ``sys.meta_path`` (no torch, no
mergekit, not even importlib.abc); when ``mergekit.merge_methods`` finishes importing, the finder's loader
calls :func:`mergekit_rlvr.kernels.register_all`.
"""

import sys

_TARGET = "mergekit.merge_methods"


class _RegisterAfterExec:
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        from mergekit_rlvr.kernels import register_all

        register_all()

    def __getattr__(self, name):  # get_source, is_package, ... for tools that ask
        return getattr(self._loader, name)


class _Finder:
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
