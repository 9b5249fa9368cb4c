"""What a coefficient means comes from the method mergekit has registered: its
coefficient parameter, that parameter's scope, default and validator."""

from __future__ import annotations

import pytest

from mergekit_rlvr.errors import UserError
from mergekit_rlvr.kernels.coefficients import coefficient, hot_swappable


def test_each_method_names_its_parameter_and_mergekit_gives_scope_and_default():
    got = {name: (c.parameter, c.per_model, c.default) for name, c in ((n, coefficient(n)) for n in hot_swappable())}
    assert got == {"dots": ("weight", True, None), "sar": ("scale", False, 1.0),
                   "reasoning_interp": ("alpha", False, 0.5), "task_arithmetic": ("weight", True, None)}


@pytest.mark.parametrize("method,value,error", [
    ("reasoning_interp", 1.5, "coefficient 'alpha': alpha must be in [0, 1], got 1.5"),
    ("reasoning_interp", -0.01, "coefficient 'alpha': alpha must be in [0, 1], got -0.01"),
    ("dots", 1e39, "coefficient 'a' is 1e+39: beyond float32's range"),
    ("sar", float("inf"), "coefficient 'a' is inf (must be finite)"),
    ("task_arithmetic", True, "coefficient 'a' is not a number: True"),
])
def test_the_one_validator_checks_float32_and_the_methods_own_range(method, value, error):
    from vllm_plugins.rpc import check_values

    name = "alpha" if method == "reasoning_interp" else "a"
    with pytest.raises(ValueError) as raised:
        check_values(method, [name], [value])
    assert str(raised.value).startswith(error)


def test_in_range_values_pass_unchanged_and_name_the_coefficient():
    assert coefficient("reasoning_interp").check(1) == 1.0
    assert coefficient("sar").check(-2.5) == -2.5
    assert coefficient("dots").check(3.4e38) == 3.4e38
    with pytest.raises(ValueError, match=r"^coefficient 'alpha@mlp': alpha must be in \[0, 1\], got 2.0"):
        coefficient("reasoning_interp").check(2.0, "alpha@mlp")


@pytest.mark.parametrize("method", ["linear", "ties", None, 3])
def test_methods_without_a_fixed_vector_sum_are_refused(method):
    with pytest.raises(UserError, match="cannot be hot-swapped; supported: dots, sar, reasoning_interp, "
                                        "task_arithmetic"):
        coefficient(method)
