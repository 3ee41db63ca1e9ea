"""When is GQ worth its cost? A seed-paired decision study on CIFAR-10 (CPU scale).

For every seed: one CE pre-training on the whole CIFAR-10 training split (cached), then every arm
fine-tunes a copy of those weights for its number of steps on the first ``steps x batch`` images
of a seed-fixed permutation of the training split (cycled when the steps need more), with the
same batch order and augmentation as every other arm of the same length. Each arm is evaluated on
the 10,000 test images and on real-image OOD sets (MNIST, textures, photo crops) and ODIN's noise
sets (kept out of the mean): ODIN (T = 1000, eps = 0.001), MSP and energy. Every finished run is
one JSON file, so the grid resumes where it stopped; ``--report-only`` rebuilds the tables and the
figures from them.

Arms (20 steps unless the name says ``_s<steps>``):

- ``ce`` (continued CE, the control); ``gq_0.1``, ``gq_1``, ``gq_10`` (CE + lambda * GQ, Eq. 7
  exact); ``gq_reversed`` (lambda = -1: GQ maximised); ``logitnorm`` (Wei et al. 2022, CE on
  ``f / (tau * (||f|| + 1e-7))``, tau = 0.04); ``reference_1`` (the authors' formulation on
  logits);
- dose-response: ``ce_s80``, ``ce_s320``, ``gq_1_s80``, ``gq_1_s320``;
- equal compute: ``ce_s1600``, CE given the measured compute of ``gq_1_s80`` (80 steps x 20.4);
- the cheap estimator: ``gq_1_k1``, ``gq_1_k3``, ``gq_1_k1_s320``, ``gq_1_k3_s320``
  (``estimator="sampled"`` with K = 1 or 3 of the 9 other classes), on the first
  ``--few-seeds`` seeds;
- the paper's regimes: ``scratch_gq_1_k1``, ``scratch_gq_0.1_k1`` and ``scratch_gq_1`` (CE +
  lambda * GQ from random weights, with the pre-training's recipe, seed and batches; control:
  the CE pre-training), and ``gq_only_k1_s390`` (the GQ term alone, no CE, for one epoch from
  the CE weights; control: those weights, evaluated in the same run), and
  ``reference_only_s390`` (the same with the authors' formulation, what their code computes);
- ``fast_cnn``'s fine-tuning: ``gq_0.1_k1_s80``, ``gq_1_k1_s80``, ``gq_3_k1_s80`` (sampled K = 1
  at three λ, against ``ce_s80``) and ``gq_1_k1_s80_float32``, the λ = 1 arm with GQ and CE in
  float32 beside its bf16 twin (an arm's ``precision`` overrides ``--precision``), and
  ``ce_s500``, CE given the measured compute of ``gq_1_k1_s80`` (80 steps x 6.2).

Every run writes a checkpoint after each epoch (under ``--cache-dir``) and resumes from it when
the grid is started again, with the numbers of an uninterrupted run; its JSON lists the epochs
where it resumed (``resumed_at_epochs``).

    python benchmarks/reproduce.py --data-dir ../shared/data --jobs 2 --order arm \
        --arms gq_only_k1_s390 scratch_gq_1_k1 scratch_gq_0.1_k1 ce gq_1 ce_s80 gq_1_s80 \
               ce_s320 ce_s1600 gq_1_s320        # the paper's regimes, then seeds 3-4
    python benchmarks/reproduce.py --data-dir ../shared/data --jobs 2 --order arm \
        --arms ce gq_1 ce_s80 ce_s320 gq_1_k1 ce_s1600 gq_1_s80 gq_1_s320 gq_1_k1_s320 \
               gq_1_k3 gq_1_k3_s320              # the longer-training grid; resumes
    python benchmarks/reproduce.py --report-only                   # tables + figures from JSON
    python benchmarks/reproduce.py --report-only --results-dir docs/reproduction/study
                                                   # the 20-step study of every loss
    python benchmarks/reproduce.py --measure-cost --arms ...       # step cost of every arm
    python benchmarks/reproduce.py --smoke                         # generated data, < 1 min

The committed runs pair with the pre-training of the machine that ran them (cached under
``--cache-dir``, not committed). Resuming on a machine without that cache pre-trains again and
says whether the test accuracy equals the stored one; CPU pre-training is not bit-identical
across machines, so a mismatch means the new runs of that seed pair only with each other.

Modules, one per concern: `arms` (what each run trains), `datasets` (the images), `training`
(one run, its checkpoints), `evaluate` (accuracy and detection metrics), `grid` (which runs,
in which order, in parallel processes), `results` (the JSON files), `report` (tables),
`figure` (plots) and `cli` (the command line of ``benchmarks/reproduce.py``).
"""

import _examples_path  # noqa: F401  (puts examples/ on sys.path for the modules below)
