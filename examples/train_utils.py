"""Plumbing shared by the example scripts: distributed setup, default device, atomic checkpoints,
RNG state, CSV logs, optional progress bars / TensorBoard (used only if installed) and the one
place that imports torchvision (:func:`torchvision_or_reason`)."""

from __future__ import annotations

import argparse
import copy
import csv
import os
import random
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Process placement: ``rank`` of ``world_size`` processes, ``device`` to use."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1) and pick a device.

    Backend: NCCL on CUDA, gloo on CPU. Each process uses ``cuda:LOCAL_RANK`` on CUDA.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = default_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def cleanup_distributed(*, wait: bool = True) -> None:
    """Leave the process group.

    After a successful run (``wait=True``) every process first waits at a barrier, so that no
    process tears down its side of the gloo/NCCL connections and exits while another one is still
    using them (the documented shutdown sequence; a process that exited early aborted at
    interpreter exit now and then). After an error there is no barrier: the other processes may
    never reach it.
    """
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a float64 tensor over processes (no-op for a single process)."""
    if info.distributed:
        values = values.to(info.device)
        dist.all_reduce(values)
    return values.cpu()


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    A crash while writing leaves the previous file intact (``os.replace`` is atomic on POSIX).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _numpy_state() -> dict[str, Any]:
    # Stored as a tensor and plain numbers so that ``torch.load(weights_only=True)`` accepts it.
    state: Any = np.random.get_state()
    _, keys, pos, has_gauss, cached = state
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def rng_state() -> dict[str, Any]:
    """Global RNG states of torch (CPU and every CUDA device), numpy and ``random``."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every process's ``obj``, in rank order (a one-element list without DDP)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


class CSVLog:
    """Append-only CSV with a fixed header; ``truncate_after(epoch)`` drops rows of epochs that a
    resumed run is about to redo."""

    def __init__(self, path: str, fields: list[str]) -> None:
        self.path, self.fields = path, fields

    def truncate_after(self, epoch: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= epoch]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            if new:
                writer.writeheader()
            writer.writerow(row)


class _PlainBar:
    """Stand-in for a tqdm bar: iterates, ignores postfix updates."""

    def __init__(self, iterable: Iterable) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self.iterable)

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress(iterable: Iterable, *, enabled: bool, **kwargs: Any) -> Any:
    """A tqdm bar over ``iterable`` when tqdm is installed and ``enabled``, else a plain wrapper
    with the same ``set_postfix`` / ``close`` methods."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(iterable, **kwargs)
        except ImportError:
            pass
    return _PlainBar(iterable)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` keeps the description's layout and shows every option's default once, also for
    options without a help text (which ``ArgumentDefaultsHelpFormatter`` alone skips); a help
    text that speaks of its default itself ("default: cuda if available", "no default") gets no
    second one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.replace("%(default)", ""):
            return text
        return super()._get_help_string(action)

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)


def default_device(name: str | None = None) -> torch.device:
    """``torch.device(name)``, or CUDA when available and ``name`` is ``None``, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def summary_writer(log_dir: str) -> Any:
    """A TensorBoard ``SummaryWriter`` if TensorBoard is installed, else ``None``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir)


def torchvision_or_reason() -> tuple[ModuleType | None, str]:
    """``(torchvision, "")`` when torchvision imports, else ``(None, why)``.

    Every example imports torchvision through here. Any exception counts as "unavailable", not
    only ``ImportError``: a torchvision built for another torch (the registry's wheel next to a
    local CPU build) raises ``RuntimeError: operator torchvision::nms does not exist`` on import.
    ``why`` completes "torchvision ...": ``"is not installed"`` or ``"is installed but does not
    import against torch X (RuntimeError: ...)"``.
    """
    try:
        import torchvision
    except ModuleNotFoundError as err:
        if err.name == "torchvision":
            return None, "is not installed"
        return None, _broken(err)
    except Exception as err:  # a torchvision built for another torch: RuntimeError, OSError, ...
        return None, _broken(err)
    return torchvision, ""


def _broken(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return (
        f"is installed but does not import against torch {torch.__version__} "
        f"({type(err).__name__}: {first})"
    )


def require_torchvision(needed_for: str, avoid: str) -> ModuleType:
    """torchvision, or an ``ImportError`` that says what needs it, why it is unavailable, and
    ``avoid``: the option that runs without it.

    Example:
        >>> try:
        ...     require_torchvision("--arch tv_resnet18", "use --arch local_resnet18")
        ... except ImportError as err:
        ...     print(str(err).startswith("--arch tv_resnet18 needs torchvision, which "))
        ... else:
        ...     print(True)
        True
    """
    torchvision, why = torchvision_or_reason()
    if torchvision is None:
        raise ImportError(
            f"{needed_for} needs torchvision, which {why}: {avoid}, or install a torchvision "
            f"built for torch {torch.__version__} (pip install torchvision, matching versions)"
        )
    return torchvision
