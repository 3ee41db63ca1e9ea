"""GQ on models sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`), package-internal.

FSDP2 keeps each parameter sharded over the processes, all-gathers a module's parameters before
its forward (and again before its backward), frees them afterwards, and reduce-scatters the
module's parameter gradients once the backward pass has gone through it. GQ's second-order graph
breaks two of these rules: it uses the gathered parameters again after FSDP has freed them, and
its parameter gradients come out of the double-backward graph in no order FSDP knows. So, under
FSDP2, one GQ call

1. gathers every module's parameters right after GQ's forward pass (`gather_parameters`) and
   keeps them allocated until the call ends (`full_parameters`: resharding after backward is
   off during the call). FSDP's own hooks would gather only the modules that GQ's input
   gradient passes through; a module whose output does not depend on the input (learned
   position embeddings, a prompt) is reached by GQ's parameter gradient only, which must find
   its gathered parameters, the tensors its forward used;
2. takes GQ's parameter (and input) gradient within the call, while every parameter is there
   (`FullParameters.hand_over`), and returns the value through a node whose backward hands that
   gradient, times the incoming one, to the gathered parameters. The node also feeds the logits
   of GQ's forward pass, so the whole forward graph, with FSDP's gradient hooks, runs after it:
   FSDP reduce-scatters GQ's gradient together with the cross-entropy gradient, as in one
   ordinary backward pass, and also when GQ's value is the whole loss;
3. restores FSDP's settings and reshards what a forward pass reshards.

Each process holds every layer's gathered parameters during a GQ call and one gradient per
parameter until `backward()`: GQ's second-order pass needs all layers at once. FSDP2 internals
read here (torch 2.13): `FSDPModule._get_fsdp_state()._fsdp_param_groups` and, on each group,
`reshard_after_backward` and `_reshard_after_forward`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from ._autograd import hand_over

__all__ = ["FullParameters", "fsdp_modules", "full_parameters", "gather_parameters"]


def fsdp_modules(model: Any) -> list[nn.Module]:
    """The FSDP2 (`fully_shard`) modules of `model`; empty when FSDP was never imported."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None or not isinstance(model, nn.Module):
        return []
    return [m for m in model.modules() if isinstance(m, fsdp.FSDPModule)]


def gather_parameters(model: Any) -> None:
    """All-gathers the parameters of every FSDP2 module of `model` that are sharded now.

    Collective: every process calls it at the same point of the same GQ call. The modules'
    registered parameters are then the gathered tensors (the ones their forward used), also for
    modules that GQ's passes never run a backward through. No-op without FSDP2 modules.
    """
    for module in fsdp_modules(model):
        module.unshard()  # type: ignore[operator]


def _groups(module: nn.Module) -> list[Any]:
    groups: list[Any] = module._get_fsdp_state()._fsdp_param_groups  # type: ignore[operator]
    return groups


class FullParameters:
    """The FSDP2 modules of one GQ call, their gathered parameters kept until it ends."""

    def __init__(self, model: nn.Module, modules: list[nn.Module]) -> None:
        self.model = model
        self.modules = modules
        self.groups = [g for m in modules for g in _groups(m)]

    def hand_over(
        self, value: Tensor, logits: Tensor, x: Tensor | None, check: Any = None
    ) -> Tensor:
        """`value` (a scalar with GQ's graph) as a node that hands its gradient to FSDP.

        The parameter gradient (and, for inputs that require grad, the input gradient `x`'s) is
        taken now (`_autograd.hand_over`, which calls `check` on it); `backward()` scales it by
        the incoming gradient. See the module docstring.
        """
        params = [q for q in self.model.parameters() if q.requires_grad]
        targets = ([x] if x is not None else []) + params
        return hand_over(value, logits, targets, check)


@contextmanager
def full_parameters(model: Any) -> Iterator[FullParameters | None]:
    """`FullParameters` for the FSDP2 modules of `model` during the block; None without any.

    Resharding after backward is off inside the block (GQ's own backward passes run FSDP's
    hooks, which gather the parameters); on exit the settings come back and the modules that
    reshard after forward are resharded, as after an ordinary forward pass.
    """
    modules = fsdp_modules(model)
    if not modules:
        yield None
        return
    held = FullParameters(model, modules)
    settings = [(g, g.reshard_after_backward) for g in held.groups]
    for group, _ in settings:
        group.reshard_after_backward = False
    try:
        yield held
    finally:
        for group, setting in settings:
            group.reshard_after_backward = setting
        for module in modules:
            if any(g._reshard_after_forward for g in _groups(module)):
                module.reshard()  # type: ignore[operator]
