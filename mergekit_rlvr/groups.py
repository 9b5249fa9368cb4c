"""Coefficients per module group (``search.groups``), beyond the DoTS paper.

A recipe's coefficient ``c`` (a model's ``weight``, sar's ``scale``, reasoning_interp's
``alpha``) becomes one coefficient per group, named ``c@group``:

    search:
      groups: true                       # the five built-in groups below
      groups: [attention, mlp]           # some of them; other tensors keep ``c``
      groups: {qk: [q_proj, k_proj], mlp: [mlp]}   # your own: name -> substrings

A tensor belongs to the first group (in the order given) one of whose filters is a
substring of its name: exactly mergekit's rule for conditional parameters
(``mergekit.config.evaluate_setting``), which classifies the tensors here too. A
recipe written back (``best.yml``) therefore carries each coefficient as mergekit's
``[{filter: .., value: ..}, ..., {value: rest}]`` list and ``mergekit-yaml``
materializes exactly what was searched. Tensors in no group keep the plain name
``c``; groups without tensors get no coefficient.

No torch here; mergekit is imported only to classify tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mergekit_rlvr.errors import UserError

#: built-in groups and their filters, in the order ``groups: true`` matches them
#: (norms first, so attention's q_norm/k_norm count as norms)
BUILTIN: Dict[str, Tuple[str, ...]] = {
    "norms": ("norm",),
    "embeddings": ("embed", "wte", "wpe"),
    "lm_head": ("lm_head",),
    "attention": ("attn", "self_attention"),
    "mlp": ("mlp", "feed_forward"),
}
SEPARATOR = "@"


@dataclass(frozen=True)
class Groups:
    """Ordered (group name, filters); first match wins."""

    items: Tuple[Tuple[str, Tuple[str, ...]], ...]

    @property
    def names(self) -> List[str]:
        return [name for name, _ in self.items]

    def conditional(self, values: Mapping[str, float], rest: Optional[float]) -> List[Dict[str, Any]]:
        """mergekit's conditional list: each group's filters with its value, then the
        rest (``values``: group -> value; groups not in it are left out)."""
        out: List[Dict[str, Any]] = []
        for name, filters in self.items:
            if name in values:
                out.extend({"filter": f, "value": values[name]} for f in filters)
        if rest is not None:
            out.append({"value": rest})
        return out

    def group_of(self, tensor_name: str) -> Optional[str]:
        """The group mergekit's filter rule puts ``tensor_name`` in (None: the rest)."""
        from mergekit.config import ConditionalParameter, evaluate_setting

        setting = [ConditionalParameter(filter=f, value=i) for i, (_, filters) in enumerate(self.items)
                   for f in filters]
        index = evaluate_setting(tensor_name, setting, validate=lambda v: v) if setting else None
        return None if index is None else self.items[int(index)][0]


def parse(value: Any, where: str = "search.groups") -> Optional[Groups]:
    """``true`` / list of built-in names / mapping name -> filter(s); None or false: no groups."""
    if value is None or value is False:
        return None
    if value is True:
        return Groups(tuple(BUILTIN.items()))
    items: List[Tuple[str, Tuple[str, ...]]] = []
    if isinstance(value, Mapping):
        for name, filters in value.items():
            if isinstance(filters, str):
                filters = [filters]
            if not isinstance(filters, (list, tuple)) or not filters or \
                    not all(isinstance(f, str) and f for f in filters):
                raise UserError(f"{where}.{name}: expected a non-empty list of tensor-name substrings,"
                                f" got {filters!r}")
            items.append((_check_name(name, where), tuple(filters)))
    elif isinstance(value, (list, tuple)):
        for name in value:
            if name not in BUILTIN:
                raise UserError(f"{where}: unknown group {name!r} (built-in: {', '.join(BUILTIN)};"
                                " or give a mapping name: [substrings])")
            items.append((name, BUILTIN[name]))
    else:
        raise UserError(f"{where}: expected true, a list of built-in groups ({', '.join(BUILTIN)})"
                        f" or a mapping name: [substrings], got {value!r}")
    if not items:
        raise UserError(f"{where}: empty (leave it out for one coefficient per model)")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise UserError(f"{where}: group {next(n for n in names if names.count(n) > 1)!r} is listed twice")
    return Groups(tuple(items))


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name or SEPARATOR in name:
        raise UserError(f"{where}: group names are non-empty strings without {SEPARATOR!r}, got {name!r}")
    return name


def of_recipe(recipe: Mapping[str, Any]) -> Optional[Groups]:
    """The recipe's ``search.groups`` (None when absent)."""
    block = recipe.get("search")
    if not isinstance(block, Mapping):
        return None
    return parse(block.get("groups"))


def grouped(coefficient: str, group: Optional[str]) -> str:
    """``c@group`` (``c`` for the rest)."""
    return coefficient if group is None else f"{coefficient}{SEPARATOR}{group}"


def split(name: str, groups: Groups, coefficients: Sequence[str]) -> Tuple[str, Optional[str]]:
    """(coefficient, group) of a grouped name; group None for the rest."""
    if name in coefficients:
        return name, None
    base, sep, group = name.rpartition(SEPARATOR)
    if sep and base in coefficients and group in groups.names:
        return base, group
    raise UserError(f"unknown coefficient {name!r}")
