"""`merge_method: sar` (paper 001): thin adapter over mergekit_rlvr.methods.sar."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, MergeMethodSpec
from mergekit.merge_methods.base import ParameterScope, ParameterSpec, TensorGroup

from mergekit_rlvr.io.fisher import fisher_store
from mergekit_rlvr.kernels.base import PreparedMergeMethod, checked, flag, label
from mergekit_rlvr.methods.sar import (
    DEFAULT_DROP_RATE,
    DEFAULT_EPSILON,
    check_drop_rate,
    check_epsilon,
    sar_vector,
)

LOG = logging.getLogger(__name__)


class SarMerge(PreparedMergeMethod):
    #: the parameter a hot-swap coefficient sets (mergekit_rlvr.kernels.coefficients)
    coefficient = "scale"
    #: the context is the Fisher stores: they pickle as their paths and each process
    #: reopens them (mergekit_rlvr.io.fisher.FisherStore), so vLLM's workers adopt it
    spec = MergeMethodSpec(
        name="sar",
        pretty_name="SAR-Merging (Fisher-arbitrated conflicts, DARE on the low private half)",
        reference_url="https://arxiv.org/abs/2606.18521",
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
        parameters=(
            ParameterSpec("fisher", Optional[str], ParameterScope.NON_BASE, default=None),
            ParameterSpec("drop_rate", checked("drop_rate", check_drop_rate), ParameterScope.SHARED,
                          default=DEFAULT_DROP_RATE),
            ParameterSpec("scale", checked("scale"), ParameterScope.SHARED, default=1.0),
            ParameterSpec("seed", checked("seed", kind=int), ParameterScope.SHARED, default=0),
            ParameterSpec("epsilon", checked("epsilon", check_epsilon), ParameterScope.SHARED,
                          default=DEFAULT_EPSILON),
            # divide DARE's survivors by 1 - drop_rate (Eq. 15); false: paper 001 Table 5's ablation
            ParameterSpec("rescale", flag("rescale"), ParameterScope.SHARED, default=True),
        ),
    )

    def context_key(self, parameters):
        fisher = parameters["fisher"]
        return tuple(fisher[i] for i in fisher)

    def swap_accumulator(self, parameters):
        """The Fisher stores are known before any tensor; each streamed tensor is
        checked against them."""
        return _Checks(self._stores(parameters))

    def _stores(self, parameters):
        check_drop_rate(parameters["drop_rate"])
        check_epsilon(parameters["epsilon"])
        fisher = parameters["fisher"]
        stores = {i: (fisher_store(fisher[i]) if fisher[i] else None) for i in fisher}
        if any(s is None for s in stores.values()):
            missing = ", ".join(label(i) for i, s in stores.items() if s is None)
            LOG.warning(
                "sar: no fisher file for %s; conflicts go to the larger |delta| (magnitude criterion)",
                missing,
            )
        return stores

    def vectors(self, group: TensorGroup, stores, *, fisher, drop_rate, scale, seed, epsilon, rescale=True):
        base = group.base.tensor
        name = group.metadata.name or ""
        entries = group.non_base
        stores = stores or {}
        fishers = [None] * len(entries)
        if all(stores.get(e.id) is not None for e in entries):
            fishers = [stores[e.id].get(name, base.shape).to(base.device) for e in entries]
        vector = sar_vector(
            base,
            [e.tensor for e in entries],
            fishers,
            drop_rate=check_drop_rate(drop_rate),
            epsilon=check_epsilon(epsilon),
            seed=seed,
            name=name,
            rescale=bool(rescale),
        )
        return [vector], [scale]


sar_merge = SarMerge()


class _Checks:
    """sar's pre-pass: every tensor's Fisher values exist with the model's shape."""

    def __init__(self, stores):
        self.stores = stores

    def add(self, name, base, models) -> None:
        for store in self.stores.values():
            if store is not None:
                store.get(name, base.shape)  # names and shapes match the model

    def context(self):
        return self.stores

    finish = context
