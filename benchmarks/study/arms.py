"""The study's arms: what each run trains, for how long, and its control."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arm:
    """One fine-tuning run: ``base`` ("ce", "logitnorm" or "none") + ``lam`` * GQ(``formulation``,
    ``estimator`` with ``num_sampled`` = K), for ``steps`` optimiser steps."""

    base: str = "ce"
    lam: float = 0.0
    formulation: str = "paper"
    estimator: str = "exact"
    num_sampled: int | None = None
    steps: int = 20
    from_scratch: bool = False  # the CE pre-training's recipe, seed and batches, with this loss
    precision: str | None = None  # overrides --precision (the float32 twin of a bf16 arm)

    @property
    def loss(self) -> Arm:
        """The same computation at the default length: arms that share it share one step cost
        (which does not depend on the value of a non-zero λ)."""
        return Arm(self.base, float(self.lam != 0), self.formulation, self.estimator,
                   self.num_sampled, precision=self.precision)  # fmt: skip


ARMS = {
    "ce": Arm(),
    "gq_0.1": Arm(lam=0.1),
    "gq_1": Arm(lam=1.0),
    "gq_10": Arm(lam=10.0),
    "gq_reversed": Arm(lam=-1.0),
    "logitnorm": Arm(base="logitnorm"),
    "reference_1": Arm(lam=1.0, formulation="reference"),
    # dose-response: does the effect grow with training?
    "ce_s80": Arm(steps=80),
    "gq_1_s80": Arm(lam=1.0, steps=80),
    "ce_s320": Arm(steps=320),
    "gq_1_s320": Arm(lam=1.0, steps=320),
    # equal compute: gq_1_s80 costs 80 x 20.4 CE steps (step_costs.json, --measure-cost)
    "ce_s1600": Arm(steps=1600),
    # the cheap estimator: the target and K of the 9 other classes
    "gq_1_k1": Arm(lam=1.0, estimator="sampled", num_sampled=1),
    "gq_1_k3": Arm(lam=1.0, estimator="sampled", num_sampled=3),
    "gq_1_k1_s320": Arm(lam=1.0, estimator="sampled", num_sampled=1, steps=320),
    "gq_1_k3_s320": Arm(lam=1.0, estimator="sampled", num_sampled=3, steps=320),
    # fast_cnn (89.5 %): a fifth of an epoch at batch 128, the advised estimator at three λ,
    # exact GQ at λ = 1, and the λ = 1 arm's float32 twin (the precision check)
    "gq_0.1_k1_s80": Arm(lam=0.1, estimator="sampled", num_sampled=1, steps=80),
    "gq_1_k1_s80": Arm(lam=1.0, estimator="sampled", num_sampled=1, steps=80),
    "gq_3_k1_s80": Arm(lam=3.0, estimator="sampled", num_sampled=1, steps=80),
    "gq_1_k1_s80_float32": Arm(
        lam=1.0, estimator="sampled", num_sampled=1, steps=80, precision="float32"
    ),
    # equal compute on fast_cnn: gq_1_k1_s80 costs 80 x 6.2 CE steps (step_costs.json)
    "ce_s500": Arm(steps=500),
    # the paper's regime: from random weights, 5 epochs (its control is the CE pre-training)
    "scratch_gq_1_k1": Arm(
        lam=1.0, estimator="sampled", num_sampled=1, steps=1950, from_scratch=True
    ),
    "scratch_gq_0.1_k1": Arm(
        lam=0.1, estimator="sampled", num_sampled=1, steps=1950, from_scratch=True
    ),
    "scratch_gq_1": Arm(lam=1.0, steps=1950, from_scratch=True),
    # the paper's Table 3: the GQ term alone (no CE) for one epoch, from the CE weights
    "gq_only_k1_s390": Arm(base="none", lam=1.0, estimator="sampled", num_sampled=1, steps=390),
    # ... and the authors' formulation alone (what their public code computes)
    "reference_only_s390": Arm(base="none", lam=1.0, formulation="reference", steps=390),
}
FEW_SEED_ARMS = (
    "gq_1_k1",
    "gq_1_k3",
    "gq_1_k1_s320",
    "gq_1_k3_s320",
    "scratch_gq_0.1_k1",
    "scratch_gq_1",
    "gq_only_k1_s390",
    "reference_only_s390",
)
DOSE_STEPS = (20, 80, 320)
# Each arm's control: CE of the same length; a longer CE arm is compared with the 20-step one.
CONTROLS = {
    name: "pretrained"
    if arm.from_scratch or arm.base == "none"
    else "ce"
    if arm.steps == 20 or arm.lam == 0
    else f"ce_s{arm.steps}"
    for name, arm in ARMS.items()
}
EQUAL_COMPUTE = (("gq_1_s80", "ce_s1600"), ("gq_1_k1_s80", "ce_s500"))  # (GQ arm, CE arm)
