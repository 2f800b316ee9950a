"""The one figure helper: every plot lowbit writes (run summaries, per-layer errors, training
curves, bit-allocation heatmaps, benchmark figures) is drawn inside :func:`figure`, which owns the
matplotlib boilerplate: an Agg canvas (no pyplot, no global backend switch, no display), the layout,
an atomic PNG write (a temporary file renamed into place: a reader never sees half a PNG), and
closing the figure::

    with figure("loss.png", figsize=(8, 4)) as (fig, ax):
        ax.plot(steps, losses)
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["figure"]


@contextlib.contextmanager
def figure(path: str, *, figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, squeeze: bool = True,
           sharey: bool = False, dpi: int = 120, tight: bool = True, **save_kw):
    """``with figure(path, figsize=...) as (fig, axes):`` draw on ``axes`` (one Axes, or an array of
    them as :meth:`matplotlib.figure.Figure.subplots` returns); on a clean exit the figure is laid out
    (``tight``) and written to ``path`` atomically as a PNG at ``dpi``; on an error nothing is written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=squeeze, sharey=sharey)
    yield fig, axes
    if tight:
        fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    try:
        fig.savefig(tmp, format="png", dpi=dpi, **save_kw)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
