"""Loss-curve PNGs drawn with Pillow (no plotting library needed for line charts)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw

from .files import atomic_file

_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
            (0, 0, 0), (255, 187, 120)]

Series = tuple[str, Sequence[tuple[float, float]]]   # legend label, (step, loss) points


def plot_loss(rows: Sequence[dict[str, Any]], path: Path, width: int = 900,
              height: int = 500) -> None:
    """A run's training loss per step (log scale), one colour per stage."""
    stages: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        stages.setdefault(r.get("stage", ""), []).append((r["step"], r.get("loss")))
    plot_series(list(stages.items()), path, "training loss", width, height)


def plot_series(series: Sequence[Series], path: Path, title: str, width: int = 900,
                height: int = 500) -> None:
    """Several loss curves on one log-scale chart, one colour per series, labels in the legend.
    Points without a positive finite loss are left out."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    curves = [(label, [(s, math.log10(v)) for s, v in points
                       if v is not None and v > 0 and math.isfinite(v)])
              for label, points in series]
    left, top, right, bottom = 70, 30, width - 20, height - 50
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 8), title, fill="black")
    everything = [p for _, points in curves for p in points]
    if everything:
        steps = [s for s, _ in everything]
        logs = [v for _, v in everything]
        x0, x1 = min(steps), max(max(steps), min(steps) + 1)
        y0, y1 = min(logs), max(max(logs), min(logs) + 1e-3)

        def xy(step: float, value: float) -> tuple[float, float]:
            return (left + (step - x0) / (x1 - x0) * (right - left),
                    bottom - (value - y0) / (y1 - y0) * (bottom - top))

        for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
            value = y0 + frac * (y1 - y0)
            y = xy(x0, value)[1]
            draw.line([left - 4, y, left, y], fill="black")
            draw.text((4, y - 6), f"{10 ** value:.3g}", fill="black")
            step = x0 + frac * (x1 - x0)
            x = xy(step, y0)[0]
            draw.line([x, bottom, x, bottom + 4], fill="black")
            draw.text((x - 10, bottom + 8), f"{step:.0f}", fill="black")
        draw.text(((left + right) / 2 - 15, height - 22), "step", fill="black")
        for i, (label, points) in enumerate(curves):
            colour = _COLOURS[i % len(_COLOURS)]
            line = [xy(s, v) for s, v in points]
            if len(line) > 1:
                draw.line(line, fill=colour, width=2)
            elif line:
                draw.point(line, fill=colour)
            draw.text((right - 260, top + 8 + 14 * i), f"- {label}", fill=colour)
    with atomic_file(Path(path)) as tmp:
        image.save(tmp, format="PNG")
