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
    ("dots", 1e39, "coefficient 'weight' is 1e+39: the merge computes in float32"),
    ("sar", float("inf"), "coefficient 'scale' is inf"),
    ("task_arithmetic", True, "coefficient 'weight' must be a number, got True"),
    ("dots", "2", "coefficient 'weight' must be a number, got '2'"),
])
def test_out_of_range_values_are_refused_naming_the_coefficient(method, value, error):
    with pytest.raises(ValueError) as raised:
        coefficient(method).check(value)
    assert str(raised.value).startswith(error)


def test_in_range_values_pass_unchanged_and_name_the_model():
    assert coefficient("reasoning_interp").check(1) == 1.0
    assert coefficient("sar").check(-2.5) == -2.5
    assert coefficient("dots").check(3.4e38) == 3.4e38
    with pytest.raises(ValueError, match="coefficient 'models/rl' is -1e"):
        coefficient("dots").check(-1e39, "models/rl")


@pytest.mark.parametrize("method", ["linear", "ties", None, 3])
def test_methods_without_a_fixed_vector_sum_are_refused(method):
    with pytest.raises(UserError, match="cannot be hot-swapped; supported: dots, sar, reasoning_interp, "
                                        "task_arithmetic"):
        coefficient(method)
