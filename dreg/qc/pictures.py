"""The QC pictures: PNG files in OUT/qc/, drawn with matplotlib (its object API and the
Agg canvas: no pyplot state, safe in worker threads).

Each slice picture shows the three orthogonal planes through the centre of the fixed
image's foreground side by side, on physical axes, with a colour bar and titles that
say what is shown. Pictures are 1500 pixels wide.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PatchCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from PIL import Image

from dreg.io import storage
from dreg.qc import slices
from dreg.qc.plan import QcPlan
from dreg.qc.report import PICTURE_GROUPS, Picture
from dreg.qc.stages import gains, read_table
from dreg.registration.outcome import (
    FAILED,
    OK,
    OUTSIDE_MOVING,
    REJECTED_METRIC,
    SKIPPED_EMPTY,
)

WIDTH_INCHES = 15.0
HEIGHT_INCHES = 5.4
DPI = 100
OUTSIDE_COLOUR = "#4a6f8a"
STATUS_COLOURS = {OK: "#2ca02c", SKIPPED_EMPTY: "#9e9e9e", OUTSIDE_MOVING: "#1f77b4",
                  REJECTED_METRIC: "#ff7f0e", FAILED: "#d62728", "unknown": "#ffffff"}


def _figure(title: str, right: float = 0.89) -> tuple[Figure, list]:
    """A figure of three slice panels side by side, and room on the right (for a colour
    bar, or a legend). Laid out by hand: a constrained layout doubled the drawing time."""
    figure = Figure(figsize=(WIDTH_INCHES, HEIGHT_INCHES), dpi=DPI)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(1, 3, left=0.05, right=right, bottom=0.11, top=0.84,
                               wspace=0.3)
    axes = [figure.add_subplot(grid[0, k]) for k in range(3)]
    figure.suptitle(title, fontsize=13)
    return figure, axes


def _colour_bar(figure: Figure, image, label: str) -> None:
    figure.colorbar(image, cax=figure.add_axes((0.915, 0.15, 0.012, 0.64)), label=label)


def _png(figure: Figure) -> bytes:
    """The figure as a PNG of 256 colours: a half to a third of the size of a full-colour
    one, which matters where the pictures are embedded (the page, the Prefect artifact)."""
    figure.canvas.draw()
    rgb = Image.fromarray(np.asarray(figure.canvas.buffer_rgba())).convert("RGB")
    buffer = io.BytesIO()
    rgb.quantize(256, method=Image.Quantize.MEDIANCUT).save(buffer, format="PNG",
                                                           optimize=True)
    return buffer.getvalue()


def _unit(plan: QcPlan) -> str:
    return plan.unit or "physical units"


def _label_axes(ax, plane: slices.Plane, unit: str, note: str = "") -> None:
    name = plane.axis_name(plane.axis)
    ax.set_title(f"{name} = {plane.position:.4g} {unit} ({plane.label} plane)"
                 + (f"\n{note}" if note else ""), fontsize=10)
    ax.set_xlabel(f"{plane.axis_name(plane.cols_axis)} ({unit})")
    ax.set_ylabel(f"{plane.axis_name(plane.rows_axis)} ({unit})")


def _show(ax, values: np.ndarray, plane: slices.Plane, cmap: str, norm, step: int = 1,
          outside_note: str = ""):
    colours = colormaps[cmap].with_extremes(bad=OUTSIDE_COLOUR)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=colours, norm=norm, origin="lower",
                      extent=plane.extent(step), interpolation="nearest")
    ax.set_aspect("equal")
    missing = ~np.isfinite(values)
    if missing.any() and outside_note:
        share = missing.mean()
        ax.text(0.01, 0.01, f"blue-grey: {outside_note} ({share:.0%} of the slice)",
                transform=ax.transAxes, fontsize=8, color="white",
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 2})
    return image


def _range(arrays: Sequence[np.ndarray], percentiles=(1, 99)) -> Normalize:
    finite = np.concatenate([a[np.isfinite(a)].ravel() for a in arrays])
    if finite.size == 0:
        return Normalize(0, 1)
    low, high = np.percentile(finite, percentiles)
    return Normalize(float(low), float(high if high > low else low + 1))


def intensity_picture(title: str, planes, arrays, unit: str, outside_note: str = "",
                      label: str = "intensity") -> bytes:
    figure, axes = _figure(title)
    norm = _range(arrays)
    for ax, plane, values in zip(axes, planes, arrays, strict=True):
        image = _show(ax, values, plane, "gray", norm, outside_note=outside_note)
        _label_axes(ax, plane, unit)
    _colour_bar(figure, image, label)
    return _png(figure)


def grid_picture(title: str, planes, arrays, lines, unit: str) -> bytes:
    figure, axes = _figure(title)
    norm = _range(arrays)
    for ax, plane, values, drawn in zip(axes, planes, arrays, lines, strict=True):
        image = _show(ax, values, plane, "gray", norm)
        for x, y in drawn:
            ax.plot(x, y, color="#ffd21f", linewidth=0.8)
        ax.set_xlim(*plane.extent()[:2])
        ax.set_ylim(*plane.extent()[2:])
        _label_axes(ax, plane, unit)
    _colour_bar(figure, image, "fixed image intensity")
    return _png(figure)


def magnitude_picture(title: str, field_slices, unit: str) -> bytes:
    figure, axes = _figure(title)
    top = max(float(np.nanmax(s.magnitude)) for s in field_slices) or 1.0
    norm = Normalize(0.0, top)
    for ax, part in zip(axes, field_slices, strict=True):
        image = _show(ax, part.magnitude, part.plane, "viridis", norm, step=part.step)
        _label_axes(ax, part.plane, unit)
    _colour_bar(figure, image, f"|u| ({unit})")
    return _png(figure)


def jacobian_picture(title: str, field_slices, unit: str) -> bytes:
    """det J on a diverging colour map centred on 1 (blue: shrinks, red: grows), folds
    (det J <= 0) outlined and marked with black crosses."""
    figure, axes = _figure(title)
    low = min(float(np.nanmin(s.determinant)) for s in field_slices)
    high = max(float(np.nanmax(s.determinant)) for s in field_slices)
    spread = max(1.0 - low, high - 1.0, 0.05)
    norm = Normalize(1.0 - spread, 1.0 + spread)
    for ax, part in zip(axes, field_slices, strict=True):
        image = _show(ax, part.determinant, part.plane, "RdBu_r", norm, step=part.step)
        if part.fold_voxels:
            ax.contour(part.determinant, levels=[0.0], colors="black", linewidths=0.8,
                       origin="lower", extent=part.plane.extent(part.step))
            ax.scatter(part.folds[:, 0], part.folds[:, 1], marker="x", s=14, c="black",
                       linewidths=0.8)
        _label_axes(ax, part.plane, unit, note=f"{part.fold_voxels} fold voxels in this slice")
    _colour_bar(figure, image, "det J (1: volume kept; ≤ 0: fold, marked ×)")
    return _png(figure)


def blocks_picture(title: str, planes, arrays, rectangles, counts: dict, unit: str) -> bytes:
    figure, axes = _figure(title, right=0.84)
    norm = _range(arrays)
    for ax, plane, values, boxes in zip(axes, planes, arrays, rectangles, strict=True):
        _show(ax, values, plane, "gray", norm)
        patches = [Rectangle((b.left, b.bottom), b.width, b.height) for b in boxes]
        ax.add_collection(PatchCollection(
            patches, facecolors=[STATUS_COLOURS.get(b.status, "#ffffff") for b in boxes],
            edgecolors="white", linewidths=0.6, alpha=0.45))
        if not boxes:
            ax.text(0.5, 0.5, "no block table recorded", transform=ax.transAxes,
                    ha="center", color="white", fontsize=11,
                    bbox={"facecolor": "black", "alpha": 0.6})
        _label_axes(ax, plane, unit)
    legend = [Patch(facecolor=colour, edgecolor="black", alpha=0.7,
                    label=f"{status}: {counts.get(status, 0)}")
              for status, colour in STATUS_COLOURS.items()
              if status != "unknown" or counts.get(status)]
    figure.legend(handles=legend, loc="center right", title="blocks (whole stage)")
    return _png(figure)


def gain_picture(title: str, stage_gains: dict[str, np.ndarray]) -> bytes:
    figure = Figure(figsize=(WIDTH_INCHES, HEIGHT_INCHES), dpi=DPI)
    FigureCanvasAgg(figure)
    figure.subplots_adjust(left=0.06, right=0.97, bottom=0.11, top=0.9)
    ax = figure.subplots()
    figure.suptitle(title, fontsize=13)
    drawn = {name: values for name, values in stage_gains.items() if values.size}
    every = np.concatenate([[0.0], *drawn.values()])
    pad = 0.05 * (every.max() - every.min()) or 0.01
    edges = np.linspace(every.min() - pad, every.max() + pad, 41)
    for name, values in drawn.items():
        ax.hist(values, bins=edges, histtype="stepfilled", alpha=0.5,
                label=f"{name} ({values.size} blocks, {np.mean(values > 0):.0%} improved)")
    ax.axvline(0.0, color="black", linewidth=1, linestyle="--")
    ax.set_xlabel("gain: similarity after − before (normalized mutual information)")
    ax.set_ylabel("blocks")
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no block has a metric before and after", transform=ax.transAxes,
                ha="center", fontsize=12)
    return _png(figure)


def _write(plan: QcPlan, name: str, title: str, caption: str, data: bytes) -> Picture:
    uri = plan.picture_uri(name)
    storage.write_bytes(uri, data)
    return Picture(name=name, uri=uri, title=title, caption=caption,
                   width=int(WIDTH_INCHES * DPI), height=int(HEIGHT_INCHES * DPI))


def draw_pictures(plan: QcPlan, group: str | None = None) -> list[Picture]:
    """Read the slices and draw the pictures into OUT/qc/; returns them in order. A
    `group` draws part of them: "images" (the fixed and moving images, checkerboards)
    or "field" (the deformation grid, |u|, det J, the block map, the metric gains), so
    that two workers can draw at once."""
    if group not in (None, *PICTURE_GROUPS):
        raise ValueError(f"group must be one of {PICTURE_GROUPS}, got {group!r}")
    planes = slices.picture_planes(plan)
    fixed = [slices.fixed_slice(plan, p) for p in planes]
    drawings = []
    if group in (None, "images"):
        drawings += _image_drawings(plan, planes, fixed)
    if group in (None, "field"):
        drawings += _field_drawings(plan, planes, fixed)
    return [_write(plan, name, title, caption, draw())
            for name, title, caption, draw in drawings]


def _image_drawings(plan: QcPlan, planes, fixed) -> list[tuple[str, str, str,
                                                                Callable[[], bytes]]]:
    unit = _unit(plan)
    before = [slices.moving_before_slice(plan, p) for p in planes]
    after = [slices.moving_after_slice(plan, p) for p in planes]
    level = f"level {plan.picture_level}"
    after_from = ("the warped image" if plan.warped
                  else "the moving image resampled through the field")
    outside = "outside the moving image"
    normalized = "normalized intensity (each image's 1st–99th percentile)"
    return [
        ("fixed", "Fixed image", f"{plan.fixed}, {level}",
         lambda: intensity_picture(f"Fixed image ({level})", planes, fixed, unit)),
        ("moving_before", "Moving image before registration",
         "the moving image through the initial transform, on the fixed image's planes",
         lambda: intensity_picture("Moving image before registration (through the initial "
                                   "transform)", planes, before, unit, outside)),
        ("moving_after", "Moving image after registration", after_from,
         lambda: intensity_picture(f"Moving image after registration ({after_from})",
                                   planes, after, unit, outside)),
        ("checkerboard_before", "Checkerboard before registration",
         "fixed and moving (initial transform) in alternating squares",
         lambda: intensity_picture(
             "Checkerboard before registration: fixed and moving image in alternating "
             "squares", planes, [slices.checkerboard(f, b) for f, b in zip(
                 fixed, before, strict=True)], unit, outside, label=normalized)),
        ("checkerboard_after", "Checkerboard after registration",
         "fixed and registered moving image in alternating squares",
         lambda: intensity_picture(
             "Checkerboard after registration: fixed and registered moving image in "
             "alternating squares", planes, [slices.checkerboard(f, a) for f, a in zip(
                 fixed, after, strict=True)], unit, outside, label=normalized)),
    ]


def _field_drawings(plan: QcPlan, planes, fixed) -> list[tuple[str, str, str,
                                                                Callable[[], bytes]]]:
    unit = _unit(plan)
    field_parts = [slices.field_slice(plan, axis) for axis in range(3)]
    return [
        ("deformation_grid", "Deformation grid",
         "the fixed image with grid lines moved to x + u(x) (in-plane part, true scale)",
         lambda: grid_picture("Fixed image with the deformation grid: lines of the fixed "
                              "grid at x + u(x) (in-plane part, not exaggerated)", planes,
                              fixed, [slices.deformation_lines(plan, p) for p in planes],
                              unit)),
        ("displacement", "Displacement |u|", "length of the displacement on the field grid",
         lambda: magnitude_picture("Displacement length |u| (fixed to moving, on the field "
                                   "grid)", field_parts, unit)),
        ("jacobian", "Jacobian determinant", "det J of x ↦ x + u(x); folds marked",
         lambda: jacobian_picture("Jacobian determinant det J of x ↦ x + u(x) (centred on "
                                  "1; folds det J ≤ 0 marked ×)", field_parts, unit)),
        *_stage_drawings(plan, planes, fixed, unit),
    ]


def _stage_drawings(plan: QcPlan, planes, fixed, unit: str) -> list:
    tables = {stage.name: read_table(stage) for stage in plan.stages}
    last = plan.stages[-1] if plan.stages else None
    if last is None:
        rectangles = [[], [], []]
        title, counts = "Block status map: no stages recorded", {}
    else:
        rectangles = [slices.block_rectangles(plan, last, tables[last.name], axis)
                      for axis in range(3)]
        size = last.block_size if last.block_size is not None else "whole image"
        title = (f"Block status map of the last stage, {last.number}-{last.name} "
                 f"({last.transform}, level {last.level}, block size {size})")
        counts = {}
        for row in tables[last.name]:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        counts = counts or last.counts
    stage_gains = {f"{s.number}-{s.name}": gains(tables[s.name]) for s in plan.stages}
    return [
        ("blocks", "Block status map", "the last stage's blocks coloured by status",
         lambda: blocks_picture(title, planes, fixed, rectangles, counts, unit)),
        ("metric_gain", "Metric gain per block",
         "similarity after minus before registration, per block and stage",
         lambda: gain_picture("Metric gain per block: normalized mutual information after "
                              "− before (> 0: the block got more alike)", stage_gains)),
    ]


