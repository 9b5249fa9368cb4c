"""Helpers the tests share (no tests here; pytest collects none of these modules).

- ``files``: the real ``mergekit-yaml`` in a subprocess, recipe files, safetensors state;
- ``recipes``: recipe builders of the tiny family, one per merge method;
- ``engines``: a HotSwapLLM for a test module, closed at the end;
- ``fake_engine``: a scripted stand-in for the search's engine protocol;
- ``pg_server``: a real PostgreSQL server from the installed binaries.

Fixtures built on them live in ``tests/conftest.py``.
"""
