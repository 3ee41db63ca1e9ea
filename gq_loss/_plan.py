"""Which method a call runs on a model, or a refusal that names what works (package-internal).

The code form of `docs/models.md`'s tables: one function, `plan_method`, takes the method the
settings resolved (`_gq_settings.check_method`: a known name, `auto` with `chunk_size` is
`recompute`, no `chunk_size` with `loop`) and the model of this call, and returns the method or
raises with the methods and set-ups that work for that model:

| model | refused | works |
|---|---|---|
| a plain callable | `recompute` | every other method |
| `nn.DataParallel` | `recompute`, `jacrev` | `loop`, `batched` (or DistributedDataParallel) |
| DistributedDataParallel | `jacrev` | `loop`, `recompute`, `batched` |
| DistributedDataParallel with `static_graph=True` | every method | `static_graph=False`, or `model.module` under `no_grad` |
| FSDP2 (`fully_shard`) | `jacrev` | `loop`, `recompute`, `batched` |
| a TorchScript module | `recompute`, `batched`, `jacrev` | `loop` |
| TorchScript submodules | `batched`, `jacrev` | `loop`, `recompute` |
| Lightning Fabric's wrapper | every method | its `.module` inside `fabric.autocast()` |

`auto` is planned like an explicit method and then resolved per call by `_auto.auto_method`,
which times only what runs. Checkpointing is not decided here: reentrant checkpointing and
`jacrev` on a checkpointed model are refused where torch refuses them
(`_autograd.second_order_errors`, `_backends._func_errors`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._fsdp import fsdp_modules
from ._runtime import unwrap_ddp
from ._torch_internals import ddp_static_graph


def plan_method(method: str, model: Any) -> str:
    """The method (`auto` or a backend) that runs `model`, or the refusal (the table above).

    Args:
        method: A method resolved by the settings (`_gq_settings.check_method`).
        model: The model of the call, wrapper included.

    Raises:
        TypeError: A method that cannot run this model (the message names those that can), or a
            Lightning Fabric-wrapped model.
        ValueError: A DistributedDataParallel model built with `static_graph=True`.
    """
    if method == "recompute" and not isinstance(model, nn.Module):
        raise TypeError(f"method='recompute' needs an nn.Module model, got {type(model).__name__}")
    if method in ("recompute", "jacrev") and isinstance(model, nn.DataParallel):
        raise TypeError(
            f"method={method!r} cannot run an nn.DataParallel-wrapped model: it calls the model "
            "through torch.func.functional_call, which DataParallel refuses; use method='loop' "
            "(or 'batched') with DataParallel, or DistributedDataParallel, which PyTorch "
            "recommends instead and with which 'recompute' runs"
        )
    if method == "jacrev" and isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "method='jacrev' cannot run a DistributedDataParallel-wrapped model (its forward "
            "would bypass DDP's gradient synchronisation); use method='loop' or 'recompute'"
        )
    if method == "jacrev" and fsdp_modules(model):
        raise TypeError(
            "method='jacrev' cannot run a model with FSDP2 (fully_shard) modules (its forward "
            "under torch.func is not covered by FSDP's gradient hooks); use method='loop', "
            "'recompute' or 'batched'"
        )
    _check_torchscript(method, model)
    _check_static_graph(model)
    _check_fabric(model)
    return method


def _check_fabric(model: Any) -> None:
    """Refuses a Lightning Fabric-wrapped model (`fabric.setup(model)`), whose outputs refuse
    every backward pass but `fabric.backward(loss)`, with the pattern that works."""
    cls = type(model)
    if cls.__name__ == "_FabricModule" and cls.__module__.startswith("lightning"):
        raise TypeError(
            "GQ cannot take its input gradients through a Lightning Fabric-wrapped model "
            "(fabric.setup(model)): Fabric lets its outputs be differentiated only by "
            "fabric.backward(loss). Pass the wrapped model's `.module` inside `fabric.autocast()` "
            "(Fabric's precision): `with fabric.autocast(): gq, logits = gq_loss(model.module, x, "
            "y, return_logits=True)`, then `fabric.backward(F.cross_entropy(logits, y) + lam * "
            "gq)` (docs/examples.md, 'Lightning Fabric')"
        )


def _check_torchscript(method: str, model: Any) -> None:
    """Refuses the methods that cannot differentiate TorchScript (`torch.jit.script`/`trace`)
    modules; `loop` runs them (checked against a float64 per-class loop). `auto` times only the
    methods that run, so it is not refused."""
    if method in ("loop", "auto") or not isinstance(model, nn.Module):
        return
    model = unwrap_ddp(model)
    whole = isinstance(model, torch.jit.ScriptModule)
    if method == "recompute" and whole:
        reason = (
            "its replay swaps the module's parameters (torch.func.functional_call), which "
            "TorchScript forbids"
        )
    elif method != "recompute" and (
        whole or any(isinstance(m, torch.jit.ScriptModule) for m in model.modules())
    ):
        reason = (
            "torch.func's graph does not reach through TorchScript, so GQ would come back without "
            "a gradient"
            if method == "jacrev"
            else "vmap has no batching rules inside the TorchScript interpreter"
        )
    else:
        return
    what = "is a TorchScript module" if whole else "has TorchScript submodules"
    raise TypeError(
        f"method={method!r} cannot run this model, which {what} (torch.jit.script or "
        f"torch.jit.trace): {reason}; use method='loop' (no chunk_size), which runs it, or pass "
        "the eager module"
    )


def _check_static_graph(model: Any) -> None:
    """Refuses a model that runs DistributedDataParallel with `static_graph=True`.

    On its first iteration such a DDP queues its one-time graph bookkeeping (and the
    gradients' all-reduce) from the first backward pass through its output; GQ's own backward
    passes inside the call are that pass, before any gradient exists, and the processes'
    gradients were then never all-reduced (measured: ranks 2.2 apart after one step). A DDP
    that runs inside the model's forward (Lightning's Trainer, which hands GQ the
    LightningModule's network) is not in `model.modules()` and not affected.
    """
    if not isinstance(model, nn.Module):
        return
    if any(ddp_static_graph(m) for m in model.modules()):
        raise ValueError(
            "gq_loss cannot run a DistributedDataParallel model built with static_graph=True: "
            "GQ's own backward passes inside the call would trigger DDP's one-time static-graph "
            "bookkeeping before any gradient exists, and the processes' gradients would never be "
            "all-reduced; build it with static_graph=False (the default; Fabric: "
            "DDPStrategy(static_graph=False)). For GQ's value alone, under torch.no_grad(), pass "
            "the wrapped module (model.module)"
        )
