"""Start `mergekit-rlvr serve`, ask one completion, change the coefficients live,
ask again, stop. Loopback only; every wait is bounded."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Dict, List


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body=None, timeout: float = 60.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return json.loads(response.read()), dict(response.headers)


def roundtrip(recipe: str, prompt: str, new_coefficients: Dict[str, float], vllm_args: List[str],
              log_path: str, start_timeout: float = 600.0) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mergekit_rlvr.cli", "serve", recipe, "--host", "127.0.0.1",
               "--port", str(port), *vllm_args]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"the server exited with code {server.returncode}; see {log_path}")
                if time.perf_counter() - started > start_timeout:
                    raise RuntimeError(f"the server did not start within {start_timeout:.0f} s; see {log_path}")
                try:
                    _request(f"{base}/v1/merge", timeout=5)
                    break
                except OSError:
                    time.sleep(1.0)
            start_s = time.perf_counter() - started
            state, _ = _request(f"{base}/v1/merge")
            model = _request(f"{base}/v1/models")[0]["data"][0]["id"]
            ask = {"model": model, "prompt": prompt, "max_tokens": 40, "temperature": 0.0}
            before, headers_before = _request(f"{base}/v1/completions", ask)
            swapped, _ = _request(f"{base}/v1/merge", {"coefficients": new_coefficients})
            after, headers_after = _request(f"{base}/v1/completions", ask)
            return {
                "start_s": round(start_s, 1),
                "before": {"coefficients": state["coefficients"], "version": state["version"],
                           "header_version": headers_before.get("x-merge-version"),
                           "text": before["choices"][0]["text"]},
                "swap": swapped,
                "after": {"coefficients": swapped["coefficients"], "version": swapped["version"],
                          "header_version": headers_after.get("x-merge-version"),
                          "text": after["choices"][0]["text"]},
            }
        finally:
            try:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
