"""ODIN scoring throughput on a CIFAR ResNet-18, next to its floor.

The floor is what any ODIN implementation has to pay, written plainly: one forward with a graph,
one backward to the input, one forward on the perturbed batch. Both are timed in the same
process with interleaved repeats; the script prints medians, images/s and the ratio
``ODINDetector / floor`` (target: within 1.2x). ``odin_score`` is the per-batch function the
detector calls; it is timed alongside.

    python benchmarks/bench_odin.py                          # batch 64, best device
    python benchmarks/bench_odin.py --device cpu --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gq_loss import ODINDetector, odin_score


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(num_classes: int = 10) -> nn.Module:
    """CIFAR ResNet-18: 3x3 stem without max-pool, stages of 2 blocks, 64 to 512 channels."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def floor_scores(model: nn.Module, x: Tensor, temperature: float, epsilon: float) -> Tensor:
    """Two forwards and one input-gradient backward, nothing else."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss = F.cross_entropy(logits / temperature, logits.argmax(1), reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    with torch.no_grad():
        return torch.softmax(model(x.detach() - epsilon * grad.sign()) / temperature, 1).amax(1)


def timed(fn: Callable[[], Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--temperature", type=float, default=1000.0)
    parser.add_argument("--epsilon", type=float, default=0.001)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = resnet18(10).to(device).eval()
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)
    detector = ODINDetector(model, temperature=args.temperature, epsilon=args.epsilon)
    runs = {
        "floor": lambda: floor_scores(model, x, args.temperature, args.epsilon),
        "ODINDetector": lambda: detector.score(x),
        "odin_score": lambda: odin_score(
            model, x, temperature=args.temperature, epsilon=args.epsilon
        ),
    }
    # Same numbers (up to float32 rounding in the sign of tiny gradients): a fair comparison.
    gap = (runs["floor"]() - runs["ODINDetector"]()).abs().max().item()
    for _ in range(args.warmup):
        for fn in runs.values():
            timed(fn, device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))  # interleave, alternate order
        for name in order:
            times[name].append(timed(runs[name], device))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"ODIN scoring, CIFAR ResNet-18, batch {args.batch_size}, {device} ({name}), "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{args.repeats} interleaved repeats, medians"
    )
    print(f"{'method':<14}{'median ms':>12}{'images/s':>12}")
    medians = {k: statistics.median(v) for k, v in times.items()}
    for k, t in medians.items():
        print(f"{k:<14}{1e3 * t:>12.1f}{args.batch_size / t:>12.1f}")
    print(
        f"ratio ODINDetector / floor: {medians['ODINDetector'] / medians['floor']:.3f}x "
        f"(target <= 1.2x); max |score difference| = {gap:.2e}"
    )


if __name__ == "__main__":
    main()
