"""Plans and records of the flows that use a finished registration: warp an image,
invert the field, transform points.

Each `plan_*` function checks everything a run needs before any work (a finished
registration in OUT, readable inputs, an image that meets the moving image, a points
file with x, y, z) and raises an InputError naming the input otherwise. The records are
what the flows return, print as their last JSON line and put in their summaries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from dreg.apply import invert, warp
from dreg.errors import InputError
from dreg.field import FIELD_CHUNK, MOVING_TO_FIXED, open_field
from dreg.grid import Grid
from dreg.io import completion, locations, ome_zarr, storage
from dreg.io.batches import chunk_batches, region_batches
from dreg.io.completion import identity_of
from dreg.layout import DERIVED, INVERSE_NAME, INVERSE_REPORT, WARPED_NAME
from dreg.registration.records import load_result

WARP_CHUNK = 64
POINTS_BATCH_ROWS = 1_000_000
Interpolation = Literal["linear", "nearest"]
Space = Literal["fixed", "moving"]


class Plan(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)


class WarpPlan(Plan):
    out: str
    field: str
    image: str
    dest: str
    interpolation: Interpolation
    fixed_grid: Grid
    dtype: str
    components: int | None
    chunk: int = WARP_CHUNK
    identity: str

    @property
    def pyramid_method(self) -> str:
        return warp.pyramid_method(self.interpolation)


class InvertPlan(Plan):
    out: str
    field: str
    fixed: str
    moving: str
    dest: str
    report: str
    moving_grid: Grid
    grid: Grid
    identity: str


class PointsPlan(Plan):
    out: str
    source: Space
    field: str
    mapping: str
    points: str
    dest: str
    rows: int
    batch_rows: int = POINTS_BATCH_ROWS
    needs_inverse: bool = False
    identity: str

    @property
    def batches(self) -> list[tuple[int, int]]:
        from dreg.io import tables  # pandas and pyarrow: only where points are moved

        return tables.batch_ranges(self.rows, self.batch_rows)


class WarpResult(BaseModel):
    output: str
    image: str
    field: str
    interpolation: str
    levels: int
    voxels: int
    chunks: int
    batches: int = 0  # task runs that wrote level 0
    seconds: float
    flow_run_id: str


class InvertResult(BaseModel):
    output: str
    field: str
    report: str
    voxels: int
    nan: int
    max: float | None
    p99: float | None
    rms: float | None
    chunks: int
    batches: int = 0  # task runs that wrote the chunks
    seconds: float
    flow_run_id: str

    def record(self, out: str) -> dict:
        """inverse.json's numbers: what lies inside OUT named relative to OUT, so that a
        copied or moved OUT names its own parts."""
        return {**self.model_dump(mode="json"),
                **{name: locations.inside(getattr(self, name), out)
                   for name in ("output", "field", "report")}}


class PointsResult(BaseModel):
    output: str
    points: str
    source: Space
    field: str
    rows: int
    outside: int
    batches: int
    seconds: float
    flow_run_id: str


def plan_warp(out: str, image: str | None = None, to: str | None = None,
              interpolation: str = "linear", overwrite: bool = False) -> WarpPlan:
    """Warp `image` (default: the registration's moving image) onto the fixed grid.

    Something already at the destination is resumed when it is this very warp (same
    inputs); otherwise it is replaced only with `overwrite`, and only when it is an
    OME-Zarr image dreg wrote: anything else is refused, naming it."""
    result = load_result(out)
    if interpolation not in warp.INTERPOLATIONS:
        raise InputError(f"interpolation {interpolation!r}: choose one of "
                         f"{', '.join(warp.INTERPOLATIONS)}")
    source = ome_zarr.open_image(image or result.moving)
    field = open_field(result.field)
    warp.check_image_meets_field(source, field)
    dest = storage.normalize_uri(to or storage.join(result.output, WARPED_NAME))
    # The warped image is created over whatever is at `dest`: it may neither lie in what
    # the warp reads nor hold it (the field also stands for OUT, which holds it).
    locations.check_apart(dest, "the warped image", {
        "the image": source.uri, "the field": field.uri, "FIXED": result.fixed,
        "MOVING": result.moving})
    storage.check_writable(_parent(dest))
    fixed_grid = Grid.from_dict(field.attributes["fixed"])
    identity = identity_of(ome_zarr.fingerprint(field), ome_zarr.fingerprint(source, [0]),
                           interpolation, fixed_grid.to_dict(), WARP_CHUNK)
    if (completion.record(dest) or {}).get(completion.INPUTS) != identity:
        ome_zarr.check_can_create(dest, ome_zarr.IMAGE, overwrite)
    return WarpPlan(out=result.output, field=field.uri, image=source.uri, dest=dest,
                    interpolation=interpolation, fixed_grid=fixed_grid,
                    dtype=source.levels[0].dtype, components=source.components,
                    identity=identity)


def plan_invert(out: str) -> InvertPlan:
    """Invert the registration's field onto the moving image's grid."""
    result = load_result(out)
    field = open_field(result.field)
    moving_grid = ome_zarr.open_image(result.moving).levels[0].grid
    dest = storage.join(result.output, INVERSE_NAME)
    for name, output in (("the inverse", dest),
                         ("the inverse report", storage.join(result.output, INVERSE_REPORT))):
        locations.check_apart(output, name, {"the field": field.uri, "FIXED": result.fixed,
                                             "MOVING": result.moving})
    # OUT/inverse.ome.zarr is derived from OUT's field: an inverse field there is resumed
    # or replaced as OUT's own; anything else at that name is refused, never removed.
    ome_zarr.check_can_create(dest, f"displacement_field/{MOVING_TO_FIXED}", overwrite=True)
    return InvertPlan(out=result.output, field=field.uri, fixed=result.fixed,
                      moving=result.moving,
                      dest=dest,
                      report=storage.join(result.output, INVERSE_REPORT),
                      moving_grid=moving_grid, grid=invert.inverse_grid(field, moving_grid),
                      identity=identity_of(ome_zarr.fingerprint(field), moving_grid.to_dict()))


def plan_points(out: str, points_uri: str, dest: str, source: str,
                batch_rows: int = POINTS_BATCH_ROWS) -> PointsPlan:
    """Move the points of `points_uri` (world x, y, z in the `source` space) into the
    other space: fixed → moving through the field, moving → fixed through the inverse
    (which the flow computes first when it is absent)."""
    if source not in ("fixed", "moving"):
        raise InputError(f"--from {source!r}: choose fixed or moving")
    from dreg.io import tables  # pandas and pyarrow: only where points are moved

    result = load_result(out)
    info = tables.check_points_file(points_uri)
    dest = storage.normalize_uri(dest)
    tables.points_format(dest)
    if dest == info.uri:
        raise InputError(f"{dest}: the output would overwrite the input points")
    locations.check_apart(dest, "the output points", {
        "the input points": info.uri, "the field": result.field, "FIXED": result.fixed,
        "MOVING": result.moving})
    storage.check_writable(_parent(dest))
    if source == "fixed":
        field, mapping, needs_inverse = result.field, open_field(result.field).attributes[
            "mapping"], False
    else:
        field = storage.join(result.output, INVERSE_NAME)
        mapping = MOVING_TO_FIXED
        needs_inverse = not inverse_is_current(out)
    identity = identity_of(storage.version_of(info.uri), field, mapping, batch_rows,
                           result.flow_run_id)
    return PointsPlan(out=result.output, source=source, field=field, mapping=mapping,
                      points=info.uri, dest=dest, rows=info.rows, batch_rows=batch_rows,
                      needs_inverse=needs_inverse, identity=identity)


def inverse_is_current(out: str) -> bool:
    """Whether OUT holds a complete inverse of its current field."""
    plan = plan_invert(out)
    return completion.is_complete(plan.dest, plan.identity)


def derived_outputs(out: str) -> list[str]:
    """What OUT holds that was computed from its field: stale once the field changes."""
    return [storage.join(out, name)
            for name in DERIVED]


def check_derived_replaceable(out: str) -> None:
    """Before a registration removes what OUT derived from its old field: refuse, naming
    it, a folder at the warped image's or the inverse's name that is not that kind of
    output written by dreg (it is not the registration's to remove)."""
    ome_zarr.check_can_create(storage.join(out, WARPED_NAME), ome_zarr.IMAGE, overwrite=True)
    ome_zarr.check_can_create(storage.join(out, INVERSE_NAME),
                              f"displacement_field/{MOVING_TO_FIXED}", overwrite=True)


def warp_chunks(plan: WarpPlan) -> list:
    return list(ome_zarr.chunk_regions(plan.fixed_grid.shape_zyx, (plan.chunk,) * 3))


def warp_batches(plan: WarpPlan, workers: int) -> list[list[int]]:
    """The level-0 chunks of the warped image, cut into batches (`chunk_batches`)."""
    return chunk_batches(plan.fixed_grid.shape_zyx, (plan.chunk,) * 3, workers)


def inverse_chunks(plan: InvertPlan) -> list:
    return list(ome_zarr.chunk_regions(plan.grid.shape_zyx, (FIELD_CHUNK,) * 3))


def inverse_batches(plan: InvertPlan, workers: int) -> list[list[int]]:
    """The inverse's chunks (indices into `inverse_chunks`) cut into batches of about
    equal voxels (`region_batches`)."""
    return region_batches(inverse_chunks(plan), workers)


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if storage.is_s3(uri) else str(Path(uri).parent)
