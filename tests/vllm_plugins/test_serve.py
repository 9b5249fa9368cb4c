"""`mergekit-rlvr serve` and the /v1/merge endpoint plugin on a real vLLM server.

One server (real `mergekit-rlvr serve` subprocess on 127.0.0.1, tiny dots recipe,
CPU) is shared by the module. Attribution is checked three ways: the
`x-merge-version` header of every response, the engine's own per-token weight
version labels (`/inference/v1/generate` reports them), and a teacher-forced
re-scoring of every generated token under the coefficients of the version it was
attributed to (the logprobs must match: a response that mixed weights would not).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest

from support import recipes
from support.files import BIN, write_recipe
from support.server import AUTH, REQUEST_TIMEOUT, get_merge, post_merge, score, start_server

requests = pytest.importorskip("requests")

#: an in-flight request long enough (seconds of decoding even on an idle machine) for a swap to land inside it
LONG_TOKENS = 2000
PLAIN_N = 8  # samples of the drain:false test's non-streaming request
#: Greedy, fixed length: every response has the same number of tokens.
GEN_TOKENS = 24
PROMPTS = [[5, 6, 7, 8], [20, 21, 22], [40, 41, 42, 43, 44], [60, 61]]


@pytest.fixture(scope="module")
def dots_recipe(tiny_family, recipe_file):
    return recipe_file(recipes.dots(tiny_family, (0.79, 1.82), parameters={"density": 0.3}), "dots.yml")


@pytest.fixture(scope="module")
def server(dots_recipe, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    srv = start_server(dots_recipe, log)
    try:
        yield srv
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- clients
def running_requests(server) -> int:
    """vLLM's vllm:num_requests_running gauge from /metrics."""
    text = requests.get(server.url + "/metrics", headers=AUTH, timeout=30).text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("vllm:num_requests_running")))


def wait_running(server, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while running_requests(server) < count:
        assert time.monotonic() < deadline, f"fewer than {count} requests running after {timeout} s"
        time.sleep(0.02)


def _stream(server, path: str, body: dict, out: dict):
    """POST a streaming request; records the status, the header version, ``done`` and
    any error in ``out`` and yields each server-sent event's choice."""
    out.update(error=None, done=False, start=time.monotonic())
    with requests.post(server.url + path, json=body, headers=AUTH, stream=True, timeout=REQUEST_TIMEOUT) as response:
        out["status"] = response.status_code
        out["version"] = response.headers.get("x-merge-version")
        for line in response.iter_lines():
            if not line.startswith(b"data: "):
                continue
            payload = line[len(b"data: "):]
            if payload == b"[DONE]":
                out["done"] = True
                break
            event = json.loads(payload)
            if "error" in event:
                out["error"] = event["error"]
                continue
            yield event["choices"][0]
    out["end"] = time.monotonic()


def stream_generate(server, token_ids, max_tokens=GEN_TOKENS, started: threading.Event | None = None) -> dict:
    """Greedy streamed generation through the token API: tokens, their logprobs,
    the header version, the engine's weight-version spans, any error. ``started``
    is set once the first tokens arrived."""
    body = {"token_ids": token_ids, "stream": True,
            "sampling_params": {"max_tokens": max_tokens, "temperature": 0, "logprobs": 0,
                                "ignore_eos": True}}
    out = {"kind": "generate", "prompt": token_ids, "tokens": [], "logprobs": [], "spans": None}
    for choice in _stream(server, "/inference/v1/generate", body, out):
        out["tokens"] += choice["token_ids"]
        if started is not None:
            started.set()
        out["logprobs"] += [entry["logprob"] for entry in choice["logprobs"]["content"]]
        if choice.get("weight_versions") is not None:
            out["spans"] = choice["weight_versions"]
    return out


def stream_completion(server, model, prompt, max_tokens=GEN_TOKENS) -> dict:
    """Streamed text completion (OpenAI API): header version, text, any error."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    out = {"kind": "completion", "text": ""}
    for choice in _stream(server, "/v1/completions", body, out):
        out["text"] += choice["text"]
    return out


def served_model(server) -> str:
    return requests.get(server.url + "/v1/models", headers=AUTH, timeout=REQUEST_TIMEOUT).json()["data"][0]["id"]


# ----------------------------------------------------------------------------- tests
@pytest.mark.vllm
@pytest.mark.slow
def test_route_reports_recipe_and_honours_api_key(server, tiny_family):
    assert get_merge(server, headers={}).status_code == 401
    assert get_merge(server, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert post_merge(server, {"coefficients": {tiny_family["rl"]: 0.5}}, headers={}).status_code == 401
    response = get_merge(server)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "method": "dots",
        "coefficients": {tiny_family["sft"]: 0.79, tiny_family["rl"]: 1.82},
        "version": 0,
    }


@pytest.mark.vllm
@pytest.mark.slow
def test_invalid_coefficients_are_rejected_and_change_nothing(server, tiny_family):
    before = get_merge(server).json()
    reference = score(server, PROMPTS[0], [10, 11, 12, 13])
    sft, rl = tiny_family["sft"], tiny_family["rl"]
    bad = [
        ({"coefficients": {"nope": 1.0}}, "unknown coefficient 'nope'"),
        ('{"coefficients": {"%s": NaN}}' % rl, "must be finite"),
        ({"coefficients": {sft: "big"}}, "must be a number"),
        ({"coefficients": [1.0]}, "list has 1 values"),
        ({"coefficients": {sft: 1.0}, "drain": "yes"}, '"drain" must be true or false'),
        ({"weights": {sft: 1.0}}, "unknown field"),
        ("{not json", "not valid JSON"),
    ]
    for body, message in bad:
        response = post_merge(server, body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]["message"]
        assert message in error and "\n" not in error, (body, error)
    assert get_merge(server).json() == before
    assert score(server, PROMPTS[0], [10, 11, 12, 13]) == reference  # weights untouched


@pytest.mark.vllm
@pytest.mark.slow
def test_swaps_under_streaming_load_never_mix_versions(server, tiny_family):
    """Four clients stream greedy generations while swaps are posted; every response
    comes from exactly one version (header == engine's label for every token ==
    teacher-forced re-scoring under that version's coefficients), none fails."""
    sft, rl = tiny_family["sft"], tiny_family["rl"]
    settings = [{sft: 0.0, rl: 0.0}, {sft: 1.5, rl: 0.5}, {sft: 0.79, rl: 1.82}]
    model = served_model(server)
    start_version = get_merge(server).json()["version"]
    coefficients_of = {start_version: get_merge(server).json()["coefficients"]}
    results, errors, swaps = [], [], []
    stop = threading.Event()

    def client(index):
        n = 0
        while not stop.is_set() and n < 400:  # bounded
            try:
                if index == 3:
                    results.append(stream_completion(server, model, "The merge ", max_tokens=GEN_TOKENS))
                else:
                    results.append(stream_generate(server, PROMPTS[(index + n) % len(PROMPTS)]))
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(repr(error))
            n += 1

    def finished_under(version: int) -> bool:
        return any(r.get("version") == str(version) and r.get("done") for r in list(results))

    def wait_for(condition, what: str, timeout: float = REQUEST_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline and not errors, (what, errors[:3])
            time.sleep(0.02)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        # Each swap is posted while requests are running (the engine's gauge says so),
        # and the next one only once a request has completed under the new version:
        # every version serves, on an idle or a loaded machine.
        for i in range(6):
            wait_running(server, 2)
            sent = time.monotonic()
            response = post_merge(server, {"coefficients": settings[i % len(settings)]})
            assert response.status_code == 200, response.text
            state = response.json()
            swaps.append((sent, time.monotonic(), state["version"]))
            coefficients_of[state["version"]] = state["coefficients"]
            wait_for(lambda: finished_under(state["version"]), f"a response under version {state['version']}")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=REQUEST_TIMEOUT)
    assert not errors, errors[:3]
    assert [v for _, _, v in swaps] == list(range(start_version + 1, start_version + 7))

    for r in results:
        assert r["status"] == 200 and r["error"] is None and r["done"], r
        assert r["version"] is not None and int(r["version"]) in coefficients_of, r
    generated = [r for r in results if r["kind"] == "generate"]
    for r in generated:
        assert len(r["tokens"]) == GEN_TOKENS, r
        assert r["spans"] == [{"version": r["version"], "start": 0, "end": GEN_TOKENS}], r
    versions = {int(r["version"]) for r in results}
    assert {v for _, _, v in swaps} <= versions, versions  # every swapped-in version served requests
    # power: some requests were in flight while a swap was posted (they were drained)
    assert any(r["start"] < sent < r["end"] for r in results for sent, _, _ in swaps)

    # Re-score every generation under its version's coefficients (set again: the
    # engine has no drift, so the same coefficients give the same weights).
    by_setting: dict[tuple, list] = {}
    for r in generated:
        key = tuple(sorted(coefficients_of[int(r["version"])].items()))
        by_setting.setdefault(key, []).append(r)
    scored = 0
    for key, runs in by_setting.items():
        assert post_merge(server, {"coefficients": dict(key)}).status_code == 200
        for r in runs[:6]:
            expected = score(server, r["prompt"], r["tokens"])
            assert max(abs(a - b) for a, b in zip(expected, r["logprobs"])) < 1e-3, (key, r["version"])
            scored += 1
    assert len(by_setting) >= 2 and scored >= 6
    # power: the settings really give different outputs (the same prompt, greedy, under each)
    outputs = set()
    for setting in settings:
        assert post_merge(server, {"coefficients": setting}).status_code == 200
        outputs.add(tuple(stream_generate(server, PROMPTS[0])["tokens"]))
    assert len(outputs) >= 2, outputs


@pytest.mark.vllm
@pytest.mark.slow
def test_drain_false_aborts_in_flight_requests_with_a_clear_error(server, tiny_family):
    rl = tiny_family["rl"]
    version = get_merge(server).json()["version"]
    before = get_merge(server).json()["coefficients"]
    model = served_model(server)
    results, started = {}, threading.Event()

    def long_stream():
        results["stream"] = stream_generate(server, PROMPTS[1], max_tokens=LONG_TOKENS, started=started)

    def long_plain():
        # as long as the context allows (3 prompt tokens), PLAIN_N samples at once (each a
        # running request): slow enough to still run at the swap on an idle machine
        body = {"model": model, "prompt": "abc", "max_tokens": 4096 - 3, "ignore_eos": True, "n": PLAIN_N}
        results["plain"] = requests.post(server.url + "/v1/completions", json=body, headers=AUTH,
                                         timeout=REQUEST_TIMEOUT)

    # The plain request gives no sign that it is running: start it first and wait until
    # the engine reports it running, then start the stream, whose first tokens we await.
    threads = [threading.Thread(target=long_plain), threading.Thread(target=long_stream)]
    threads[0].start()
    wait_running(server, PLAIN_N)
    threads[1].start()
    assert started.wait(REQUEST_TIMEOUT)
    assert running_requests(server) == PLAIN_N + 1  # both in flight at the swap
    response = post_merge(server, {"coefficients": {rl: 0.25}, "drain": False})
    for thread in threads:
        thread.join(timeout=REQUEST_TIMEOUT)
    assert response.status_code == 200, response.text
    state = response.json()
    assert state["version"] == version + 1 and state["drained"] is False
    assert state["coefficients"][rl] == 0.25  # a partial update keeps the other names' values
    assert state["coefficients"][tiny_family["sft"]] == before[tiny_family["sft"]]

    stream = results["stream"]
    assert stream["status"] == 200 and stream["version"] == str(version)
    assert 0 < len(stream["tokens"]) < LONG_TOKENS, stream  # cut short, only old-version tokens
    assert stream["error"]["code"] == 503
    assert f"swapped to version {version + 1} with drain=false" in stream["error"]["message"]
    plain = results["plain"]
    assert plain.status_code == 503, plain.text
    assert plain.headers["x-merge-version"] == str(version)
    assert "drain=false" in plain.json()["error"]["message"]

    after = stream_generate(server, PROMPTS[1], max_tokens=4)
    assert after["version"] == str(version + 1) and after["error"] is None


@pytest.mark.vllm
@pytest.mark.slow
def test_drain_timeout_reports_503_and_changes_nothing(server, tiny_family):
    before = get_merge(server).json()
    results, started = {}, threading.Event()

    def long_stream():
        results["stream"] = stream_generate(server, PROMPTS[2], max_tokens=LONG_TOKENS, started=started)

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert started.wait(REQUEST_TIMEOUT)
    response = post_merge(server, {"coefficients": {tiny_family["rl"]: 3.0}, "timeout": 0.1})
    thread.join(timeout=REQUEST_TIMEOUT)
    assert response.status_code == 503, response.text
    assert "did not finish within 0.1 s" in response.json()["error"]["message"]
    assert get_merge(server).json() == before
    stream = results["stream"]  # the in-flight request was not disturbed
    assert stream["error"] is None and len(stream["tokens"]) == LONG_TOKENS
    assert stream["spans"] == [{"version": str(before["version"]), "start": 0, "end": LONG_TOKENS}]


# ----------------------------------------------------------------------------- no engine
@pytest.mark.parametrize("enabled", [False, True])
def test_route_exists_only_when_the_plugin_is_enabled(enabled, tiny_family, monkeypatch):
    """vLLM's own app builder: without VLLM_PLUGINS naming the plugin, /v1/merge 404s."""
    from starlette.testclient import TestClient
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    if enabled:
        monkeypatch.setenv("VLLM_PLUGINS", "mergekit_rlvr")
    else:
        monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", tiny_family["base"]])
    client = TestClient(build_app(args, ("generate",)))
    get, post = client.get("/v1/merge"), client.post("/v1/merge", json={"coefficients": [1.0]})
    if enabled:
        assert get.status_code == 409 and "no merge recipe is loaded" in get.json()["error"]["message"]
        assert post.status_code == 409
    else:
        assert get.status_code == 404 and post.status_code in (404, 405)


@pytest.mark.slow
def test_serve_rejects_bad_input_in_one_line(tiny_family, tmp_path):
    recipe = write_recipe(tmp_path / "ties.yml", {
        "merge_method": "ties", "base_model": tiny_family["base"],
        "models": [{"model": tiny_family["sft"], "parameters": {"weight": 1.0, "density": 0.5}}]})
    good = write_recipe(tmp_path / "ok.yml", {
        "merge_method": "dots", "base_model": tiny_family["base"],
        "models": [{"model": tiny_family["sft"], "parameters": {"weight": 1.0}}]})
    cases = [
        ([str(tmp_path / "missing.yml")], "recipe file not found"),
        ([str(recipe)], "cannot be hot-swapped"),
        ([str(good), "--model", "x"], "option --model cannot be given"),
    ]
    for args, message in cases:
        proc = subprocess.run([str(BIN / "mergekit-rlvr"), "serve", *args], capture_output=True,
                              text=True, timeout=120, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


# ----------------------------------------------------------------------------- pure parts
def test_alpha_range_is_checked_before_the_engine_sees_it():
    from vllm_plugins.serving_merge import MergeRequestError, check_method_values, parse_swap_request

    values, drain, timeout = parse_swap_request({"coefficients": {"alpha": 0.25}}, ["alpha"], [0.5])
    assert (values, drain, timeout) == ([0.25], True, None)
    check_method_values("reasoning_interp", ["alpha"], values)
    with pytest.raises(MergeRequestError, match=r"alpha.*\[0, 1\]") as error:
        check_method_values("reasoning_interp", ["alpha"], [1.5])
    assert error.value.status == 400
    check_method_values("sar", ["scale"], [7.0])  # sar's scale has no range


def test_gate_admits_under_one_version_and_waits_for_in_flight_requests():
    """Pure asyncio/ASGI: a request arriving during a swap waits and runs under the
    new version; the swap starts only after the admitted request finished. Every
    step waits on an event, none on time."""
    import asyncio

    from vllm_plugins.serving_gate import AdmissionGate, MergeVersionMiddleware

    events = []

    async def main():
        started, release = asyncio.Event(), asyncio.Event()

        async def app(scope, receive, send):  # a streaming response in two parts
            events.append(("app start", scope["path"]))
            started.set()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            if scope["path"] == "/first":
                await release.wait()  # in flight until the swap and the second request are queued
            await send({"type": "http.response.body", "body": b"x", "more_body": False})
            events.append(("app end", scope["path"]))

        async def call(middleware, path):
            sent = []

            async def receive():
                await asyncio.Event().wait()  # the client never sends more

            async def send(message):
                sent.append(message)

            await middleware({"type": "http", "method": "POST", "path": path}, receive, send)
            return dict(sent[0]["headers"])[b"x-merge-version"]

        async def until(condition):
            while not condition():
                await asyncio.sleep(0)  # yield to the other tasks

        gate = AdmissionGate()
        middleware = MergeVersionMiddleware(app, gate)
        first = asyncio.ensure_future(call(middleware, "/first"))
        await started.wait()

        async def swap():
            async with gate.closed(drain=True, timeout=5, reason="test"):
                events.append(("swap", gate.in_flight))
                gate.version = 1

        swapping = asyncio.ensure_future(swap())
        await until(lambda: not gate.is_open)
        second = asyncio.ensure_future(call(middleware, "/second"))
        for _ in range(10):  # the second request is parked at the closed gate, not run
            await asyncio.sleep(0)
        assert events == [("app start", "/first")]
        release.set()
        return await first, await second, await swapping

    first, second, _ = asyncio.run(main())
    assert (first, second) == (b"0", b"1")
    assert events == [("app start", "/first"), ("app end", "/first"), ("swap", 0),
                      ("app start", "/second"), ("app end", "/second")]
