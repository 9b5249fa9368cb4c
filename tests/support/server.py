"""A real ``mergekit-rlvr serve`` subprocess on 127.0.0.1 for the tests, and the
clients more than one test module uses (test_serve, test_serve_replicas)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

from support.files import BIN

API_KEY = "test-key-1234"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
STARTUP_TIMEOUT = 600  # seconds; a loaded 2-core machine needs a few minutes for three processes
REQUEST_TIMEOUT = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the server's own session: it and its engine
                self.proc.wait(timeout=30)


def start_server(recipe: Path, log: Path, *extra: str, env: dict | None = None) -> Server:
    port = _free_port()
    cmd = [
        str(BIN / "mergekit-rlvr"), "serve", str(recipe),
        "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY,
        "--max-model-len", "4096", "--kv-cache-memory-bytes", str(64 << 20), "--enforce-eager",
        "--enable-scale-out",  # /inference/v1/generate: the engine's per-token weight versions
        *extra,
    ]
    env = dict(os.environ if env is None else env, PYTHONWARNINGS="ignore")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(proc, port, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{server.tail()}")
        try:
            if requests.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(1)
    server.stop()
    raise AssertionError(f"server not ready after {STARTUP_TIMEOUT} s:\n{server.tail()}")


# ----------------------------------------------------------------------------- clients
def get_merge(server, headers=AUTH):
    return requests.get(server.url + "/v1/merge", headers=headers, timeout=REQUEST_TIMEOUT)


def post_merge(server, body, headers=AUTH):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(server.url + "/v1/merge", data=data, headers=headers, timeout=REQUEST_TIMEOUT)


def score(server, prompt, tokens) -> list[float]:
    """Teacher-forced logprobs of ``tokens`` after ``prompt`` (one prefill)."""
    body = {"token_ids": prompt + tokens,
            "sampling_params": {"max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}}
    response = requests.post(server.url + "/inference/v1/generate", json=body, headers=AUTH,
                             timeout=REQUEST_TIMEOUT)
    assert response.status_code == 200, response.text
    entries = response.json()["prompt_logprobs"][len(prompt):]
    return [entry[str(token)]["logprob"] for entry, token in zip(entries, tokens)]
