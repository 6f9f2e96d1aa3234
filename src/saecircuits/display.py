"""Notebook display of the analysis results: every result object is a :class:`NotebookDisplay`.

A result renders itself in Jupyter (``_repr_html_``: a one-line title and its table, every string escaped by
pandas), gives its numbers as a ``pandas.DataFrame`` (``.to_pandas()``) and its main plot as a plotly figure
(``.figure()``, which Jupyter draws itself). Nothing here downloads anything.

The plotting helpers draw means with their 95% intervals the way the report does (bars with error bars).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["NotebookDisplay", "bar_figure", "scatter_figure", "histogram_figure", "meanci_rows", "percent",
           "token_label"]


class NotebookDisplay:
    """Mixin: ``_repr_html_`` from :meth:`to_pandas` and :meth:`display_title`; subclasses define both and
    :meth:`figure`."""

    def display_title(self) -> str:
        return type(self).__name__

    def to_pandas(self):  # pragma: no cover - every subclass defines it
        """The result's numbers as a ``pandas.DataFrame``."""
        raise NotImplementedError

    def figure(self):  # pragma: no cover - every subclass defines it
        """The result's main plot as a ``plotly.graph_objects.Figure``."""
        raise NotImplementedError

    def __str__(self) -> str:
        """What ``print(result)`` shows: the title and the table (20 rows at most), not the raw tensors of the
        dataclass fields (their ``repr`` stays available)."""
        df = self.to_pandas()
        rows = len(df)
        table = df.to_string(max_rows=20, float_format=lambda v: f"{v:.4g}")
        more = f"\n({rows} rows; .to_pandas() has them all)" if rows > 20 else ""
        return f"{self.display_title()}\n{table}{more}\n(.figure() plots it; the fields hold the per-prompt values)"

    def _repr_html_(self) -> str:
        df = self.to_pandas()
        rows = len(df)
        table = df.to_html(max_rows=20, float_format=lambda v: f"{v:.4g}", border=0, escape=True)
        more = f" ({rows} rows; <code>.to_pandas()</code> has them all)" if rows > 20 else ""
        return (f"<div><b>{html.escape(self.display_title())}</b>{more}{table}"
                "<small><code>.figure()</code> plots it.</small></div>")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def percent(x: Any, decimals: int = 0) -> str:
    """A share (1 = 100%) as a percentage with ``decimals`` decimals for a sentence, never rounded to a claim it
    does not make: a nonzero share that would round to 0 is "<1%" (decimals 0; "<0.1%" with 1; ">-1%" when
    negative), not "0%", and one short of the whole that would round to 100 is ">99%" (">99.9%"), not "100%";
    exactly 0 and 1 stay "0%" and "100%"; not a finite number: "n/a". Every rounded percentage of the summaries
    (the report's headline and notes, the circuit's position summary, the console) goes through it."""
    if not _finite(x):
        return "n/a"
    x = float(x)
    text = f"{100 * x:.{decimals}f}"
    step = 10.0 ** -decimals  # the smallest percentage shown
    if x != 0 and float(text) == 0:
        return f"<{step:g}%" if x > 0 else f">-{step:g}%"
    if x < 1 and float(text) == 100:
        return f">{100 - step:g}%"
    return text + "%"


def meanci_rows(items: dict[str, Any]) -> list[dict]:
    """``{name: MeanCI}`` as rows ``{"run", "mean", "ci95_low", "ci95_high", "n"}``."""
    return [{"run": k, "mean": m.mean, "ci95_low": m.low, "ci95_high": m.high, "n": m.n} for k, m in items.items()]


def token_label(token: str, token_id: int) -> str:
    """A token as a plot label, shown as the report and the console show it: its visible form in quotes
    (:func:`saecircuits.report.summary.quoted_token`: whitespace and control characters made visible, no Python
    escapes), then its id. Plain text; the figure helpers escape it for plotly."""
    from saecircuits.report.summary import quoted_token

    return f"{quoted_token(token)} ({token_id})"


def _plotly_text(s: Any) -> str:
    """``s`` as text for plotly, which renders ``<b>``, ``<br>`` and other tags in labels and titles: escaped."""
    return html.escape(str(s), quote=True)


def bar_figure(labels: Sequence[str], means: Sequence[float], *, low: Sequence[float] | None = None,
               high: Sequence[float] | None = None, title: str = "", yaxis: str = "", color: str = "#1f77b4"):
    """Bars of ``means`` with asymmetric 95% error bars from ``low``/``high`` (missing where not finite).

    Labels and titles are plain text: they are escaped here, since plotly renders tags such as ``<b>`` in them."""
    import plotly.graph_objects as go

    err = None
    if low is not None and high is not None:
        err = dict(type="data", symmetric=False, visible=True,
                   array=[h - m if _finite(h) and _finite(m) else None for m, h in zip(means, high, strict=True)],
                   arrayminus=[m - lo if _finite(lo) and _finite(m) else None for m, lo in zip(means, low, strict=True)])
    fig = go.Figure(go.Bar(x=[_plotly_text(x) for x in labels], y=[m if _finite(m) else None for m in means],
                           error_y=err, marker_color=color))
    fig.update_layout(title=_plotly_text(title), yaxis_title=_plotly_text(yaxis), xaxis_type="category",
                      template="plotly_white")
    return fig


def scatter_figure(x: Sequence[float], y: Sequence[float], *, text: Sequence[str] | None = None, title: str = "",
                   xaxis: str = "", yaxis: str = "", color: str = "#d62728"):
    """A scatter plot of ``(x, y)`` points, hover text ``text``."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=list(x), y=list(y), mode="markers",
                               text=None if text is None else [_plotly_text(t) for t in text],
                               marker=dict(color=color, size=6, opacity=0.7)))
    fig.update_layout(title=_plotly_text(title), xaxis_title=_plotly_text(xaxis), yaxis_title=_plotly_text(yaxis),
                      template="plotly_white")
    return fig


def histogram_figure(values: Sequence[float], *, title: str = "", xaxis: str = "", yaxis: str = "count",
                     color: str = "#9467bd"):
    """A histogram of the finite ``values``."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Histogram(x=[v for v in values if _finite(v)], nbinsx=40, marker_color=color))
    fig.update_layout(title=_plotly_text(title), xaxis_title=_plotly_text(xaxis), yaxis_title=_plotly_text(yaxis),
                      template="plotly_white")
    return fig
