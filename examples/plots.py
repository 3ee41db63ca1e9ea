"""Figures shared by ``demo.py`` and ``evaluate_ood.py`` (matplotlib, optional).

Every figure is a row of panels, one per model (e.g. "CE" and "CE + GQ"), each showing the
distribution of one quantity on the in-distribution test set and on every OOD set:

- :func:`score_histograms` -- detector scores, ID vs OOD (ODIN by default), on the scale that
  ``detector.score()`` returns;
- :func:`gradient_norm_density` -- the paper's Fig. 1: ``||grad_x log S_yhat(x; T)||_1`` at the
  predicted class, on a log axis;
- :func:`logit_gap_density` -- the paper's Fig. 2: top-1 minus top-2 logit.

Each figure carries a caption under its panels: what it shows and, where the caller passes one,
the bottom line. :func:`premise_caption` writes the bottom line of Fig. 1 and Fig. 2 from the
data: whether the in-distribution set has the largest median, as ODIN's premise (and the
paper) predicts, or where the measurement disagrees.

Quantities are computed elsewhere (with ``gq_loss``); this module only draws. It uses the
non-interactive Agg backend and writes PNG files. :func:`matplotlib_available` lets a script skip
its figures with a message instead of failing when matplotlib is not installed.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping

import numpy as np

#: Panels: model name -> {dataset name -> 1-D array of values}; the first dataset is the ID set.
Panels = Mapping[str, Mapping[str, np.ndarray]]

ID_COLOR = "black"
OOD_COLORS = ("tab:red", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")


def matplotlib_available() -> bool:
    """True when matplotlib can be imported (figures are optional in the example scripts)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "figures need matplotlib: `pip install matplotlib` (or pass --no-figures)"
        ) from err
    matplotlib.use("Agg")  # file output only; never opens a window
    import matplotlib.pyplot as plt

    return plt


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).ravel()
    return values[np.isfinite(values)]


def histogram_panels(
    panels: Panels,
    path: str,
    *,
    title: str,
    xlabel: str,
    log_x: bool = False,
    bins: int = 40,
    note: str | None = None,
    caption: str | None = None,
) -> str:
    """Draw one panel per model with a step histogram per dataset and save a PNG.

    Bins are shared by all panels (the same x range everywhere) and have equal widths on the
    drawn axis (log-spaced with ``log_x``); each histogram shows the share of the dataset's
    samples per bin, so datasets of different sizes compare directly. The first dataset of each
    panel is drawn in black (name it as the in-distribution set), the others in colours; each
    legend entry gives the number of samples.

    Args:
        panels: Model name -> {dataset name -> values ``(n,)``}; non-finite values are dropped.
        path: Output file (``.png``); its folder is created.
        title: Figure title.
        xlabel: Label of the x axis (the quantity and its unit).
        log_x: Logarithmic bins and x axis (values <= 0 are dropped).
        bins: Number of bins.
        note: Optional small text under the title (e.g. the settings).
        caption: Optional text under the panels: what the figure shows, what to conclude.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    cleaned = {
        model: {name: _finite(v) for name, v in sets.items()} for model, sets in panels.items()
    }
    if log_x:
        cleaned = {m: {n: v[v > 0] for n, v in s.items()} for m, s in cleaned.items()}
    pooled = np.concatenate([v for s in cleaned.values() for v in s.values()] + [np.zeros(0)])
    if pooled.size == 0:
        lo, hi = (1.0, 10.0) if log_x else (0.0, 1.0)
    else:
        lo, hi = float(pooled.min()), float(pooled.max())
        if hi <= lo:  # all values equal: give the bins some width
            lo, hi = (lo / 2, lo * 2) if log_x else (lo - 0.5, hi + 0.5)
    edges = np.geomspace(lo, hi, bins + 1) if log_x else np.linspace(lo, hi, bins + 1)

    width = max(7.5, 5.2 * len(cleaned))
    fig, axes = plt.subplots(1, len(cleaned), figsize=(width, 4.2), sharex=True, squeeze=False)
    for ax, (model, sets) in zip(axes[0], cleaned.items(), strict=True):
        for k, (name, values) in enumerate(sets.items()):
            color = ID_COLOR if k == 0 else OOD_COLORS[(k - 1) % len(OOD_COLORS)]
            label = f"{name} (n={values.size})"
            if values.size == 0:
                ax.plot([], [], color=color, label=label)
                continue
            ax.hist(
                values,
                bins=edges,
                weights=np.full(values.size, 1.0 / values.size),
                histtype="step",
                linewidth=2.0 if k == 0 else 1.4,
                color=color,
                label=label,
            )
        ax.set_title(model)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("share of samples per bin")
        if log_x:
            _log_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    chars = int(width * 13)  # wrap long titles to the figure width (about 13 chars per inch)
    text = "\n".join(textwrap.fill(t, chars) for t in (title, note) if t)
    fig.suptitle(text, fontsize=11)
    if caption:  # under the panels, in a strip the figure grows by
        wrapped = textwrap.fill(caption, int(width * 15))
        strip = 0.2 + 0.16 * (wrapped.count("\n") + 1)  # inches
        fig.set_figheight(fig.get_figheight() + strip)
        fig.text(0.01, 0.01, wrapped, fontsize=8.5, va="bottom")
        fig.tight_layout(rect=(0, strip / fig.get_figheight(), 1, 1))
    else:
        fig.tight_layout()
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _log_axis(ax) -> None:  # type: ignore[no-untyped-def]
    """Log x axis with plain-number tick labels at 1, 2, 3 and 5 times powers of ten."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def score_histograms(
    panels: Panels,
    path: str,
    *,
    method: str = "ODIN",
    xlabel: str | None = None,
    note: str | None = None,
    caption: str | None = None,
) -> str:
    """Detector scores, ID vs every OOD set (higher = more in-distribution), as the detector's
    ``score()`` returns them (at T = 1000, ODIN's scores lie within about 1e-3 of 1/N); see
    :func:`histogram_panels`."""
    return histogram_panels(
        panels,
        path,
        title=f"{method} scores: in-distribution vs OOD (higher = more in-distribution)",
        xlabel=xlabel or f"{method} score",
        note=note,
        caption=caption,
    )


def gradient_norm_density(
    panels: Panels,
    path: str,
    *,
    temperature: float,
    note: str | None = None,
    caption: str | None = None,
) -> str:
    """The paper's Fig. 1: density of ``||grad_x log S_yhat(x; T)||_1`` (log axis)."""
    return histogram_panels(
        panels,
        path,
        title=(
            "Input-gradient L1 norm of log-softmax at the predicted class "
            f"(T = {temperature:g}; paper Fig. 1)"
        ),
        xlabel=r"$\|\nabla_x \log S_{\hat y}(x;T)\|_1$ (log scale)",
        log_x=True,
        note=note,
        caption=caption,
    )


def logit_gap_density(
    panels: Panels, path: str, *, note: str | None = None, caption: str | None = None
) -> str:
    """The paper's Fig. 2: density of the logit gap, top-1 minus top-2 logit."""
    return histogram_panels(
        panels,
        path,
        title="Logit gap: largest minus second-largest logit (paper Fig. 2)",
        xlabel="top-1 logit - top-2 logit",
        note=note,
        caption=caption,
    )


def logit_gap(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit per row of ``(n, N)`` logits (``N >= 2``), shape ``(n,)``.

    Example:
        >>> logit_gap(np.array([[3.0, 1.0, 2.5], [0.0, 4.0, 1.0]])).tolist()
        [0.5, 3.0]
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"`logits` must have shape (n, N >= 2), got {logits.shape}")
    top2 = np.sort(logits, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


ODIN_XLABEL = "detector.score(x)  (T = {t:g}, ε = {e:g})"

GRADIENT_CAPTION = (
    "What it shows: per input, the L1 norm of the input gradient of log S_ŷ at T, the quantity "
    "of the paper's Fig. 1. ODIN's premise, and the paper's figure, is that in-distribution "
    "inputs have larger norms than OOD inputs, so that ODIN's step raises their score more."
)
GAP_CAPTION = (
    "What it shows: per input, the largest minus the second-largest logit, the quantity of the "
    "paper's Fig. 2. ODIN's premise is that in-distribution inputs get larger gaps (more "
    "confident predictions) than OOD inputs."
)


def premise_caption(panels: Panels, quantity: str) -> str:
    """Bottom line of Fig. 1 / Fig. 2: does the in-distribution set (the first of each panel)
    have the largest median ``quantity``, as ODIN's premise predicts? Names every OOD set whose
    median is at least the ID median, and says that this disagrees with the paper.

    Example:
        >>> premise_caption({"CE": {"ID": np.array([1.0, 3.0]), "noise": np.array([5.0])}}, "norm")
        'Bottom line: against the premise, with CE the median norm of noise (5) is not below the in-distribution median (2); here our measurement disagrees with the paper.'
    """
    against = []
    for model, sets in panels.items():
        (_, id_values), *ood = sets.items()
        id_median = float(np.median(_finite(id_values))) if len(id_values) else float("nan")
        above = [
            f"{name} ({float(np.median(_finite(v))):.3g})"
            for name, v in ood
            if len(v) and float(np.median(_finite(v))) >= id_median
        ]
        if above:
            against.append(
                f"with {model} the median {quantity} of {', '.join(above)} is not below the "
                f"in-distribution median ({id_median:.3g})"
            )
    if not against:
        return (
            f"Bottom line: as the premise predicts, the in-distribution set has the largest "
            f"median {quantity} with every model."
        )
    return (
        "Bottom line: against the premise, "
        + "; ".join(against)
        + "; here our measurement disagrees with the paper."
    )
