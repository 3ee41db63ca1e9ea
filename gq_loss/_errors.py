"""gq-loss's own error type (package-internal module; `GQLossError` is exported from `gq_loss`)."""

from __future__ import annotations


class GQLossError(RuntimeError):
    """An error gq-loss raised itself at run time: a PyTorch refusal translated into what to do
    instead (reentrant checkpointing, an operation without a second derivative, a model
    `torch.func` cannot transform), or one of its own run-time refusals (`method="recompute"`
    asked for a second-order gradient, a float16 overflow).

    A subclass of `RuntimeError`, the type PyTorch raises for those refusals, so
    `except RuntimeError` keeps catching it; the message starts with `gq_loss:` and the PyTorch
    error, where there was one, is its `__cause__`. Bad arguments still raise `ValueError` and
    `TypeError`.

    Examples:
        >>> import torch
        >>> from gq_loss import GQLossError, gq_loss
        >>> layers = torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3)
        >>> model = torch.nn.Sequential(*layers)
        >>> gq = gq_loss(model, torch.randn(2, 4), torch.tensor([0, 1]), method="recompute")
        >>> try:
        ...     torch.autograd.grad(gq, list(model.parameters()), create_graph=True)
        ... except RuntimeError as err:
        ...     print(type(err).__name__, isinstance(err, GQLossError))
        GQLossError True
    """
