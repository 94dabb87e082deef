"""Plots the chapters share: training curves, the quality-vs-parameters trade-off, and
stacked memory bars. Each returns the matplotlib Axes so a chapter can add to it."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from .experiment import Result
from .train import History

KINDS_COLORS = {"weights": "#4C72B0", "gradients": "#DD8452", "optimizer": "#55A868", "activations": "#C44E52"}


def _axes(ax: Axes | None, size=(6, 3.5)) -> Axes:
    return ax if ax is not None else plt.subplots(figsize=size)[1]


def plot_histories(histories: Mapping[str, History], ax: Axes | None = None) -> Axes:
    """Eval accuracy against optimizer step, one line per run."""
    ax = _axes(ax)
    for name, h in histories.items():
        ax.plot(h.eval_steps, h.eval_accuracy, marker="o", label=name)
    ax.set(xlabel="optimizer step", ylabel="eval accuracy")
    ax.legend(fontsize=8)
    return ax


def plot_tradeoff(
    points: Mapping[str, tuple[int, float]], ax: Axes | None = None, baseline: float | None = None
) -> Axes:
    """Eval accuracy against trainable parameters (log scale): {name: (trainable, accuracy)}."""
    ax = _axes(ax)
    for name, (n, acc) in points.items():
        ax.scatter(n, acc, s=30)
        ax.annotate(name, (n, acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", lw=1, label="majority class")
        ax.legend(fontsize=8)
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="eval accuracy")
    return ax


def plot_results(results: Mapping[str, Result], ax: Axes | None = None, baseline: float | None = None) -> Axes:
    """Mean eval accuracy against trainable parameters (log scale), with 95% confidence intervals over seeds as
    error bars: {name: Result} from `minipeft.experiment`."""
    ax = _axes(ax)
    for name, r in results.items():
        ax.errorbar(r.trainable, r.mean, yerr=r.half_width, fmt="o", ms=5, capsize=3)
        ax.annotate(name, (r.trainable, r.mean), textcoords="offset points", xytext=(5, 3), fontsize=8)
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", lw=1, label="majority class")
        ax.legend(fontsize=8)
    seeds = sorted({len(r.seeds) for r in results.values()})
    ax.set(
        xscale="log",
        xlabel="trainable parameters",
        ylabel=f"eval accuracy (mean, 95% CI, {'/'.join(map(str, seeds))} seeds)",
    )
    return ax


def plot_memory(
    rows: Mapping[str, Mapping[str, float]], unit: float = 2**30, unit_name: str = "GiB", ax: Axes | None = None
) -> Axes:
    """Stacked bars of bytes by kind (weights, gradients, optimizer, activations) per row."""
    ax = _axes(ax, (7, 3.5))
    names = list(rows)
    bottom = [0.0] * len(names)
    for kind, color in KINDS_COLORS.items():
        values = [rows[n].get(kind, 0) / unit for n in names]
        if any(values):
            ax.bar(names, values, bottom=bottom, color=color, label=kind)
            bottom = [b + v for b, v in zip(bottom, values, strict=False)]
    ax.set(ylabel=unit_name)
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=20)
    return ax


# --- "Try it" widgets that work without a kernel -------------------------------------------------------------------
# A chapter's widget is a function of a few discrete controls. `explore` calls it once per combination of values
# when the cell runs, keeps what it drew and printed, and returns one HTML block: the controls, every precomputed
# result, and a few lines of inline JavaScript that show the result matching the controls. The same output works
# on the static book page, in JupyterLab and in Colab, with no kernel callback and no JavaScript library.

MAX_FRAMES = 100  # each frame is drawn when the cell runs (~0.1 s) and is an image in the page (~5 KB)


class Explorer:
    """The precomputed widget `explore` returns; displays as HTML (`_repr_html_`)."""

    def __init__(self, controls: dict[str, list], default: dict[str, object], frames: dict[str, str], title: str):
        self.controls, self.default, self.frames, self.title = controls, default, frames, title

    def _control_html(self, name: str, values: list) -> str:
        import html

        start = values.index(self.default[name])
        label = f'<label style="margin-right:1.2em">{html.escape(name)} '
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return (
                f'{label}<input type="range" data-name="{html.escape(name)}" min="0" max="{len(values) - 1}" '
                f'step="1" value="{start}" style="vertical-align:middle"> '
                f'<output data-values="{html.escape(_json(values))}">{html.escape(str(values[start]))}</output></label>'
            )
        options = "".join(
            f'<option value="{i}"{" selected" if i == start else ""}>{html.escape(str(v))}</option>'
            for i, v in enumerate(values)
        )
        return f'{label}<select data-name="{html.escape(name)}">{options}</select></label>'

    def _repr_html_(self) -> str:
        uid = f"mp-explore-{uuid.uuid4().hex[:12]}"
        start = ",".join(str(values.index(self.default[n])) for n, values in self.controls.items())
        controls = "".join(self._control_html(n, v) for n, v in self.controls.items())
        frames = "".join(
            f'<div class="mp-frame" data-key="{key}"{"" if key == start else " hidden"}>{body}</div>'
            for key, body in self.frames.items()
        )
        return (
            f'<div class="mp-explore" id="{uid}" data-frames="{len(self.frames)}">'
            f'<div class="mp-controls" style="margin:0.4em 0">{controls}</div>{frames}'
            f"<script>{_SCRIPT.replace('UID', uid)}</script></div>"
        )

    def __repr__(self) -> str:
        return f"<{self.title}: {len(self.frames)} precomputed results over {', '.join(self.controls)}>"


_SCRIPT = """(function () {
  var root = document.getElementById("UID");
  var inputs = root.querySelectorAll("[data-name]");
  function update() {
    var key = Array.prototype.map.call(inputs, function (el) { return el.value; }).join(",");
    root.querySelectorAll(".mp-frame").forEach(function (f) { f.hidden = f.dataset.key !== key; });
    root.querySelectorAll("output").forEach(function (o) {
      o.textContent = JSON.parse(o.dataset.values)[o.previousElementSibling.value];
    });
  }
  inputs.forEach(function (el) { el.addEventListener("input", update); el.addEventListener("change", update); });
})();"""


def _json(values: list) -> str:
    import json

    return json.dumps([v if isinstance(v, int | float) else str(v) for v in values])


def _png(fig, dpi: int) -> str:
    """The figure as a data URI, palette-quantized (a frame is 3-4x smaller, text stays crisp)."""
    import base64
    import io

    from PIL import Image

    raw = io.BytesIO()
    fig.savefig(raw, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    raw.seek(0)
    image = Image.open(raw).convert("RGB").quantize(colors=96, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, format="png", optimize=True)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def explore(fn, /, dpi: int = 80, **controls) -> Explorer:
    """Precompute `fn` over every combination of `controls` (name=list of values) for a widget that needs no kernel.

    `fn(**values)` draws with matplotlib (and/or prints); its figures and printed text make one frame. A numeric
    control becomes a slider over its listed values, any other a drop-down. The starting value is `fn`'s default
    for that argument when it is one of the listed values, else the first. Display the returned object (last
    expression of a cell) to get the widget.
    """
    import contextlib
    import html
    import inspect
    import io
    import itertools

    if not controls:
        raise ValueError("explore needs at least one control, e.g. explore(show, r=[1, 2, 4])")
    controls = {name: list(values) for name, values in controls.items()}
    empty = [name for name, values in controls.items() if not values]
    if empty:
        raise ValueError(f"explore: control(s) {empty} have no values")
    n_frames = 1
    for values in controls.values():
        n_frames *= len(values)
    if n_frames > MAX_FRAMES:
        sizes = " x ".join(f"{n}:{len(v)}" for n, v in controls.items())
        raise ValueError(f"explore: {sizes} = {n_frames} combinations, more than {MAX_FRAMES}; list fewer values")
    params = inspect.signature(fn).parameters
    unknown = [name for name in controls if name not in params]
    if unknown:
        raise ValueError(f"explore: {fn.__name__} has no argument(s) {unknown}")
    default = {}
    for name, values in controls.items():
        d = params[name].default
        default[name] = d if d is not inspect.Parameter.empty and d in values else values[0]

    frames = {}
    show = plt.show
    plt.show = lambda *args, **kwargs: None  # inline backends would display (and close) each figure
    try:
        for key in itertools.product(*(range(len(v)) for v in controls.values())):
            kwargs = {name: values[i] for (name, values), i in zip(controls.items(), key, strict=True)}
            plt.close("all")
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                fn(**kwargs)
            alt = html.escape(", ".join(f"{n}={v}" for n, v in kwargs.items()))
            images = [_png(plt.figure(num), dpi) for num in plt.get_fignums()]
            body = "".join(f'<img src="{src}" alt="{alt}" style="max-width:100%">' for src in images)
            if printed.getvalue():
                body = f'<pre style="white-space:pre-wrap">{html.escape(printed.getvalue())}</pre>' + body
            frames[",".join(map(str, key))] = body
    finally:
        plt.close("all")
        plt.show = show
    return Explorer(controls, default, frames, f"explore({fn.__name__})")
