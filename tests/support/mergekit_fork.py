"""The real ``mergekit-yaml`` for the tests, without paying its imports per run.

Importing mergekit (transformers, peft, torch) costs a fresh ``mergekit-yaml`` process
about 10 s of CPU; the merges the tests run take about one. So the suite starts one
server process the way the console script starts (the venv's interpreter, whose
``.pth`` hook registers our methods), loads the console script's own entry point
(``mergekit.scripts.run_yaml:main``, read from the installed entry points) and imports
what it imports, and then forks one child per run. Each child is a separate process
with its own argv, working directory, stdout and stderr: it runs ``main`` exactly as
the console script does (an exception goes to ``sys.excepthook``, as the interpreter
sends it, then exit code 1) and reports its exit code.

Protocol: the client writes one JSON request a line to the server's stdin
(``{"id", "argv", "cwd", "stdout", "stderr"}``, the last two file paths) and reads
``"<id> <exit code>"`` lines from its stdout, one per finished run, in any order.
The parent never merges, so every child starts from the same freshly imported state.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def _entry_point():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "mergekit-yaml"]
    main = script.load()
    import mergekit.merge  # noqa: F401  (what every run imports; registers our methods via the hook)
    import mergekit.merge_methods  # noqa: F401

    return main


def _run(main, request, respond: int) -> None:
    """In the forked child: one mergekit-yaml run; never returns."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    code = 1
    try:
        os.chdir(request["cwd"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, key in ((1, "stdout"), (2, "stderr")):
            out = os.open(request[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
        sys.argv = ["mergekit-yaml", *request["argv"]]
        try:
            result = main()
            code = 0 if result is None else int(result)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:  # noqa: BLE001 - what the interpreter does with it
            sys.excepthook(*sys.exc_info())
            code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os.write(respond, f"{request['id']} {code}\n".encode())
        os._exit(code)


def serve() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # not tests/support's modules
    main = _entry_point()
    respond = os.dup(1)  # responses only: nothing else may write there
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    os.write(respond, b"ready\n")
    for line in sys.stdin:
        request = json.loads(line)
        if os.fork() == 0:
            _run(main, request, respond)


if __name__ == "__main__":
    serve()


# --------------------------------------------------------------------------- client
class Server:
    """The server process, started on first use and stopped at interpreter exit."""

    def __init__(self, env: dict, timeout: float = 900.0):
        import subprocess

        self.env = env
        self.timeout = timeout
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=dict(self.env, PYTHONWARNINGS="ignore"))
        self._buffer = b""
        self._next = 0
        if self._lines(1) != ["ready"]:
            raise RuntimeError("the mergekit-yaml fork server did not start")

    def _lines(self, count: int):
        """The next ``count`` response lines, waiting at most ``timeout`` s in all."""
        import select
        import time

        deadline = time.monotonic() + self.timeout
        fd = self.proc.stdout.fileno()
        while self._buffer.count(b"\n") < count:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"mergekit-yaml runs did not finish within {self.timeout} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError("the mergekit-yaml fork server exited")
            self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n", count)
        return [line.decode() for line in lines]

    def run_all(self, argvs, workdir: str):
        """One ``mergekit-yaml`` run per argv, all at once; a CompletedProcess each."""
        import subprocess

        requests = []
        for argv in argvs:
            self._next += 1
            base = os.path.join(workdir, f"mergekit-yaml-{os.getpid()}-{self._next}")
            requests.append({"id": self._next, "argv": [str(a) for a in argv], "cwd": os.getcwd(),
                             "stdout": base + ".out", "stderr": base + ".err"})
        self.proc.stdin.write(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
        self.proc.stdin.flush()
        codes = dict(line.split() for line in self._lines(len(requests)))
        results = []
        for r in requests:
            with open(r["stdout"]) as out, open(r["stderr"]) as err:
                results.append(subprocess.CompletedProcess(["mergekit-yaml", *r["argv"]], int(codes[str(r["id"])]),
                                                           out.read(), err.read()))
            os.unlink(r["stdout"])
            os.unlink(r["stderr"])
        return results

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
