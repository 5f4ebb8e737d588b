"""A loss-curve PNG drawn with Pillow (no plotting library needed for one line chart)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw

from .files import atomic_file

_STAGE_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def plot_loss(rows: Sequence[dict[str, Any]], path: Path, width: int = 900,
              height: int = 500) -> None:
    """Training loss per step (log scale), one colour per stage, stage names in the legend."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    points = [(r["step"], r["loss"], r.get("stage", "")) for r in rows
              if r.get("loss") is not None and r["loss"] > 0]
    left, top, right, bottom = 70, 30, width - 20, height - 50
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 8), "training loss", fill="black")
    if points:
        steps = [p[0] for p in points]
        logs = [math.log10(p[1]) for p in points]
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
        stages = list(dict.fromkeys(p[2] for p in points))
        for i, stage in enumerate(stages):
            colour = _STAGE_COLOURS[i % len(_STAGE_COLOURS)]
            line = [xy(s, v) for (s, _, name), v in zip(points, logs) if name == stage]
            if len(line) > 1:
                draw.line(line, fill=colour, width=2)
            elif line:
                draw.point(line, fill=colour)
            draw.text((right - 150, top + 8 + 14 * i), f"- {stage}", fill=colour)
    with atomic_file(Path(path)) as tmp:
        image.save(tmp, format="PNG")
