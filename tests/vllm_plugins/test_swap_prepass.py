"""The hot swap's workers take the driver's pre-pass instead of reading every
checkpoint again for it: `serve` passes it to its server process (no engine here)."""

from __future__ import annotations

import pickle

import yaml

from mergekit_rlvr.decompose import decompose


def test_serve_hands_its_prepass_to_the_server(tiny_family, tmp_path):
    from mergekit_rlvr.cli.serve import PREPARED_ENV, server_command
    from vllm_plugins.spec import decode_prepared

    recipe = {"merge_method": "dots", "base_model": tiny_family["base"], "dtype": "float32", "models": [
        {"model": tiny_family["sft"], "parameters": {"weight": 0.7, "density": 0.3}},
        {"model": tiny_family["rl"], "parameters": {"weight": 1.3, "density": 0.5}}]}
    path = tmp_path / "dots.yml"
    path.write_text(yaml.safe_dump(recipe))
    _, env = server_command(path, ["--max-model-len", "512"], environ={PREPARED_ENV: "stale"})
    driver = decompose(str(path))
    driver.prepare()
    handed = pickle.loads(decode_prepared(env[PREPARED_ENV]))  # what the endpoint hands its workers (adopt)
    assert handed == driver._context and driver._context.thresholds  # dots' thresholds and norms
