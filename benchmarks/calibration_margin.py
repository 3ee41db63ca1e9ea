"""How far a detector's scores move with the batch they are scored in, against the calibration
margin's scale: the median distance of the scores to the threshold's (`calibration_margin`).

For each detector, model and seed, the scores of ``n`` samples scored as one batch are compared
with the same samples scored in batches of 1, 3, 7 and 16; the script prints the largest change
divided by that median, worst over the seeds (the margin is ``CALIBRATION_MARGIN`` = 1e-4 of it),
and how many samples beyond ``ceil(tpr · n)`` the margin accepts on the calibration data.

    python benchmarks/calibration_margin.py
    python benchmarks/calibration_margin.py --n 1000 --seeds 3
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from gq_loss import EnergyDetector, MahalanobisDetector, MSPDetector, ODINDetector
from gq_loss._detector import CALIBRATION_MARGIN


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 64), nn.Tanh(), nn.Linear(64, 5))


def conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 10),
    ).eval()  # fmt: skip


MODELS = {"mlp": (mlp, (3, 2, 2), "2"), "conv": (conv, (3, 4, 4), "5")}
DETECTORS = {
    "msp_T1000": lambda m, layer, x: MSPDetector(m, temperature=1000.0),
    "msp": lambda m, layer, x: MSPDetector(m),
    "odin": lambda m, layer, x: ODINDetector(m),
    "energy": lambda m, layer, x: EnergyDetector(m),
    "mahalanobis": lambda m, layer, x: MahalanobisDetector(m, layer=layer, ridge=1e-6).fit(
        (torch.rand(60, *x.shape[1:]), torch.arange(60) % 5)
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--tpr", type=float, default=0.95)
    args = parser.parse_args()
    torch.set_num_threads(1)
    k = math.ceil(args.tpr * args.n)
    print(f"n = {args.n}, tpr = {args.tpr}, margin = {CALIBRATION_MARGIN:g} x median |s_i - s_k|")
    print("| model | detector | batch effect / median | samples beyond ceil(tpr n) |")
    print("|---|---|---|---|")
    for arch, (make_model, shape, layer) in MODELS.items():
        for name, make in DETECTORS.items():
            worst, extra = 0.0, 0
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                x = torch.rand(args.n, *shape)
                detector = make(make_model(), layer, x)
                whole = detector.score(x)
                ordered = whole.sort(descending=True).values
                spread = float((ordered - ordered[k - 1]).abs().median())
                for size in (1, 3, 7, 16):
                    detector.batch_size = size
                    worst = max(worst, float((detector.score(x) - whole).abs().max()) / spread)
                detector.batch_size = None
                detector.calibrate(x, tpr=args.tpr)
                extra += int((whole >= detector.threshold_).sum()) - k
            print(f"| {arch} | {name} | {worst:.1e} | {extra} over {args.seeds} seeds |")


if __name__ == "__main__":
    main()
