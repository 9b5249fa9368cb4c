"""Every shipped recipe in recipes/ parses with mergekit's own config parser (what
`mergekit-yaml` runs first), names its coefficients, has valid search settings, and
marks every model that is not a real Hub id as a placeholder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yml"))
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.-]+)?")


def test_there_are_recipes():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_parses_with_mergekit(path):
    from mergekit.config import MergeConfiguration

    from mergekit_rlvr.decompose import coefficient_names_of
    from mergekit_rlvr.hub import model_strings
    from mergekit_rlvr.search.settings import load_settings

    text = path.read_text()
    recipe = yaml.safe_load(text)
    config = MergeConfiguration.model_validate(recipe)
    assert config.merge_method == recipe["merge_method"]
    assert coefficient_names_of(recipe)
    load_settings(recipe.get("search"), None, recipe["merge_method"])
    for model in model_strings(recipe):
        placeholder = "PLACEHOLDER" in model or model.startswith("path/to/")
        assert placeholder or HUB_ID.fullmatch(model), f"{path.name}: {model} is neither a Hub id nor a placeholder"
        if placeholder:  # said so next to it, with what to put there
            line = next(i for i, l in enumerate(text.splitlines()) if model in l)
            assert "PLACEHOLDER" in "\n".join(text.splitlines()[max(0, line - 3):line + 1]), model
