"""`dreg view`: the fixed image, the warped image and det J of the field in Neuroglancer,
served from this process chunk by chunk.

Neuroglancer (its PyPI package) runs a small web server that hands the browser the
viewer and, for each layer, the voxels of the boxes it asks for. Each layer here is a
`PyramidVolume`: a box is read from OME-Zarr with `read_region` (only the chunks it
touches), never a whole level. A coarse view asks for a box at a downsampling factor;
it is read from the image's own pyramid level of that factor (or the finest level whose
factor divides it, averaging the rest), so a zoomed-out view of a large volume reads the
coarse chunks that cross it, not the full-resolution voxels under them. det J is
computed for each box as it is asked for (`dreg.qc.jacobian`, a one-voxel halo), on the
field's own grid.

Every layer is placed in physical space by its grid (spacing, origin, direction), so
layers on different grids overlay: the field's grid is coarser than the image's by the
field factor, and det J keeps that grid. Neuroglancer puts voxel i's centre at i + 0.5
and OME-Zarr/ITK at i, so each layer is shifted by half a voxel to match. A pyramid
level of dreg sits on every second voxel of the level above (`dreg.io.pyramid`), while
Neuroglancer takes a coarse voxel to be the mean of the block it covers: a coarse view
from level k is off by at most half a voxel of that level.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field

import neuroglancer
import numpy as np
from neuroglancer import downsample
from neuroglancer.chunks import encode_jpeg, encode_npz

from dreg.errors import DregError, InputError, one_line
from dreg.field import open_field
from dreg.grid import Grid, Region, region_from_bounds
from dreg.io import ome_zarr, storage
from dreg.layout import QC_FILE, QC_FOLDER, WARPED_NAME
from dreg.qc.jacobian import region_determinant
from dreg.qc.plan import current_warped, intensity_range
from dreg.registration.records import load_result

HOST = "127.0.0.1"  # the viewer is for the person at this machine; never another address
FIXED, WARPED, JACOBIAN = "fixed", "warped", "det J"
# Metres per unit, for the units OME-Zarr names (Neuroglancer counts space in metres).
METRES = {"angstrom": 1e-10, "picometer": 1e-12, "nanometer": 1e-9, "micrometer": 1e-6,
          "millimeter": 1e-3, "centimeter": 1e-2, "decimeter": 1e-1, "meter": 1.0,
          "kilometer": 1e3, "inch": 0.0254, "foot": 0.3048}
# The data types Neuroglancer's volumes carry; others are sent as float32.
SERVED_DTYPES = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "float32"}
JACOBIAN_RANGE = (0.5, 1.5)  # the colour scale of det J (blue below 1, red above) ...
JACOBIAN_HALF_WIDTH = (0.05, 0.5)  # ... or, when OUT has a QC, 1 ± its spread, within these
PANEL_PIXELS = 600  # the zoom at start shows the fixed image's x and y extent in about this

# Fixed in magenta and warped in green, added: where they agree the overlay is grey.
CHANNEL_SHADER = """#uicontrol invlerp normalized
void main() {{ float v = clamp(normalized(), 0.0, 1.0); emitRGB(vec3({r}, {g}, {b})); }}"""
JACOBIAN_SHADER = """#uicontrol invlerp normalized
void main() {
  float v = getDataValue();
  if (!(v > 0.0)) { emitRGB(vec3(1.0, 1.0, 0.0)); return; }  // folds (det J <= 0): yellow
  float t = clamp(normalized(), 0.0, 1.0);
  emitRGB(t < 0.5 ? mix(vec3(0.1, 0.3, 1.0), vec3(1.0), 2.0 * t)
                  : mix(vec3(1.0), vec3(1.0, 0.1, 0.0), 2.0 * t - 1.0));
}"""


@dataclass
class ViewPlan:
    """What `dreg view OUT` shows: the images and field it opened, and what is missing."""

    out: str
    fixed: ome_zarr.OmeZarrImage
    field: ome_zarr.OmeZarrImage
    warped: ome_zarr.OmeZarrImage | None
    missing: list[str] = field(default_factory=list)
    jacobian_range: tuple[float, float] = JACOBIAN_RANGE


def plan_view(out_uri: str) -> ViewPlan:
    """Open OUT's fixed image, field and warped image (metadata only). InputError naming
    the input when OUT is not a finished registration or its images cannot be opened.
    A missing warped image is no error: the viewer shows the rest and says so."""
    result = load_result(out_uri)
    fixed = ome_zarr.open_image(result.fixed, require_scalar=True)
    field_image = open_field(result.field)
    warped = current_warped(result)
    missing = []
    if warped is None:
        where = storage.join(result.output, WARPED_NAME)
        state = ("is not complete or was not made from this field" if storage.exists(where)
                 else "does not exist")
        missing.append(f"{WARPED}: {where} {state} (make it with `dreg warp {result.output}`)")
    return ViewPlan(out=result.output, fixed=fixed, field=field_image, warped=warped,
                    missing=missing, jacobian_range=jacobian_range(result.output))


def jacobian_range(out: str) -> tuple[float, float]:
    """det J's colour scale: 1 ± the spread OUT's QC measured (its 1st percentile and
    maximum, qc.json), so that a gentle deformation is not all white; JACOBIAN_RANGE
    without a QC."""
    try:
        numbers = json.loads(storage.read_text(storage.join(out, QC_FOLDER, QC_FILE)))[
            "jacobian"]
        spread = max(1.0 - float(numbers["p01"]), float(numbers["max"]) - 1.0)
    except (OSError, DregError, ValueError, KeyError, TypeError):
        return JACOBIAN_RANGE
    half = float(np.clip(spread, *JACOBIAN_HALF_WIDTH))
    return (1.0 - half, 1.0 + half)


# ----------------------------------------------------------------------------- arrays


class LevelArray:
    """One level of an OME-Zarr image as an array that reads only what is indexed."""

    def __init__(self, image: ome_zarr.OmeZarrImage, level: int) -> None:
        self.image, self.level = image, level
        self.grid = image.level(level).grid
        self.shape = self.grid.shape_zyx
        self.dtype = np.dtype(image.level(level).dtype)

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        return ome_zarr.read_region(self.image, self.level, _region(index, self.shape))


class DeterminantArray:
    """det J of a field on the field's grid, computed for the voxels indexed."""

    def __init__(self, field_image: ome_zarr.OmeZarrImage) -> None:
        self.field = field_image
        self.grid = field_image.levels[0].grid
        self.shape = self.grid.shape_zyx
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        det, _ = region_determinant(self.field, _region(index, self.shape))
        return det.astype(np.float32)


def _region(index: tuple[slice, ...], shape_zyx) -> Region:
    starts, stops = [], []
    for part, n in zip(index, shape_zyx, strict=True):
        start, stop, step = part.indices(n)
        if step != 1:
            raise ValueError("only contiguous boxes are read")
        starts.append(start)
        stops.append(max(stop, start))
    return region_from_bounds(starts, stops)


def pyramid_levels(image: ome_zarr.OmeZarrImage) -> list[LevelArray]:
    """The image's levels that halve the one before (shape ceil(n / 2^k) and spacing
    2^k times level 0's), finest first, stopping at the first that does not: only such a
    level can stand for Neuroglancer's downsampling by 2^k."""
    levels = [LevelArray(image, 0)]
    base = image.levels[0].grid
    for k in range(1, len(image.levels)):
        grid = image.levels[k].grid
        shape = tuple(math.ceil(n / 2**k) for n in base.shape_zyx)
        if grid.shape_zyx != shape or not np.allclose(
                grid.spacing_xyz, np.asarray(base.spacing_xyz) * 2**k, rtol=1e-3):
            break
        levels.append(LevelArray(image, k))
    return levels


class PyramidVolume(neuroglancer.LocalVolume):
    """A Neuroglancer volume over a list of levels (level k: factor 2^k on every axis).
    A box asked for at factor f is read from the coarsest level whose factor divides f,
    and averaged over the rest. Counts the boxes it served (`served`)."""

    def __init__(self, levels: list, dimensions: neuroglancer.CoordinateSpace) -> None:
        # Downsampling as far as the pyramid reaches, then at most 4 x 4 x 4 on the fly.
        super().__init__(levels[0], dimensions=dimensions, volume_type="image",
                         max_downsampling=8 ** (len(levels) - 1) * 64)
        if self.data_type not in SERVED_DTYPES:  # e.g. int64, bool: sent as float32
            self.data_type = "float32"
        self.levels = levels
        self.served = 0
        self.voxels_read = 0
        self._lock = threading.Lock()

    def get_encoded_subvolume(self, data_format, start, end, scale_key):
        factor = np.array(scale_key.split(","), dtype=np.int64)
        start, end = np.asarray(start, dtype=np.int64), np.asarray(end, dtype=np.int64)
        shape = np.asarray(self.shape, dtype=np.int64)
        if (len(factor) != 3 or len(start) != 3 or len(end) != 3 or np.any(factor < 1)
                or np.prod(factor) > self.max_downsampling):
            raise ValueError("Invalid downsampling factor.")
        if np.any(end < start) or np.any(start < 0) or np.any(end > -(-shape // factor)):
            raise ValueError("Out of bounds data request.")
        k = 0
        while k + 1 < len(self.levels) and np.all(factor % 2 ** (k + 1) == 0):
            k += 1
        level, rest = self.levels[k], factor // 2**k
        box = tuple(slice(int(a * r), int(min(n, b * r)))
                    for a, b, r, n in zip(start, end, rest, level.shape, strict=True))
        try:
            data = level[box]
        except DregError as exc:  # a chunk that cannot be read: the browser is told why
            raise ValueError(one_line(str(exc))) from None
        with self._lock:
            self.served += 1
            self.voxels_read += int(data.size)
        data = data.astype(self.data_type, copy=False)
        if np.any(rest != 1):
            data = downsample.downsample_with_averaging(data, rest).astype(data.dtype)
        if data_format == "jpeg":
            return encode_jpeg(data), "image/jpeg"
        if data_format == "npz":
            return encode_npz(data), "application/octet-stream"
        if data_format == "raw":  # neuroglancer's encode_raw calls tostring, gone in NumPy 2
            return np.ascontiguousarray(data).tobytes(), "application/octet-stream"
        raise ValueError("Invalid data format requested.")


# ----------------------------------------------------------------------------- space


def unit_metres(unit: str | None) -> tuple[str, float]:
    """Neuroglancer's unit and the scale of one of the image's units: metres for a
    length OME-Zarr names, else unitless."""
    if unit in METRES:
        return "m", METRES[unit]
    return "", 1.0


def space(names: list[str], unit: str | None) -> neuroglancer.CoordinateSpace:
    """Axes of one image unit each."""
    name, scale = unit_metres(unit)
    return neuroglancer.CoordinateSpace(names=names, units=[name] * 3, scales=[scale] * 3)


def source_matrix(grid: Grid) -> np.ndarray:
    """The 3 x 4 matrix taking a Neuroglancer voxel coordinate of the grid's array
    (axes z, y, x; voxel i spans [i, i + 1)) to the world point (x, y, z, in the image's
    unit) that ITK gives its index: origin + direction · (spacing ∘ index)."""
    to_world = grid.index_to_world_matrix[:, ::-1]  # rows world x, y, z; columns z, y, x
    origin = np.asarray(grid.origin_xyz, dtype=float)
    return np.hstack([to_world, (origin - to_world @ np.full(3, 0.5))[:, None]])


def layer_source(volume: PyramidVolume, grid: Grid, world: neuroglancer.CoordinateSpace
                 ) -> neuroglancer.LayerDataSource:
    transform = neuroglancer.CoordinateSpaceTransform(output_dimensions=world,
                                                      matrix=source_matrix(grid))
    return neuroglancer.LayerDataSource(url=volume, transform=transform)


# ----------------------------------------------------------------------------- viewer


@dataclass
class RunningViewer:
    """A viewer being served: its URL and the volumes behind its layers."""

    url: str
    viewer: neuroglancer.Viewer
    volumes: dict[str, PyramidVolume]
    missing: list[str]


def start_viewer(plan: ViewPlan, port: int = 0) -> RunningViewer:
    """Serve the plan's layers on HOST at `port` (0: any free port). One viewer per
    process: Neuroglancer's server is the process's own."""
    neuroglancer.stop()
    neuroglancer.set_server_bind_address(HOST, port)
    # Arrays are z, y, x; the world is shown x, y, z, so that the "xy" panel is the xy plane.
    voxels, world = space(["z", "y", "x"], plan.fixed.unit), space(["x", "y", "z"],
                                                                  plan.fixed.unit)
    images = {FIXED: plan.fixed, **({WARPED: plan.warped} if plan.warped else {})}
    volumes = {name: PyramidVolume(pyramid_levels(image), voxels)
               for name, image in images.items()}
    volumes[JACOBIAN] = PyramidVolume([DeterminantArray(plan.field)], voxels)
    grids = {name: volume.levels[0].grid for name, volume in volumes.items()}
    try:
        viewer = neuroglancer.Viewer()
    except OSError as exc:
        raise InputError(f"--port {port}: cannot serve on {HOST}:{port} "
                         f"({exc.strerror or exc})") from None
    overlay = plan.warped is not None
    colours = {FIXED: ("v", "0.0" if overlay else "v", "v"), WARPED: ("0.0", "v", "0.0")}
    lows, highs = grids[FIXED].world_bounds()
    with viewer.txn() as state:
        state.dimensions = world
        state.position = (lows + highs) / 2
        state.cross_section_scale = float(np.max((highs - lows)[:2]) / PANEL_PIXELS)
        for name, image in images.items():
            red, green, blue = colours[name]
            state.layers[name] = neuroglancer.ImageLayer(
                source=layer_source(volumes[name], grids[name], world),
                shader=CHANNEL_SHADER.format(r=red, g=green, b=blue),
                shader_controls={"normalized": {"range": list(intensity_range(image))}},
                opacity=1.0, blend="additive" if name == WARPED else None)
        state.layers[JACOBIAN] = neuroglancer.ImageLayer(
            source=layer_source(volumes[JACOBIAN], grids[JACOBIAN], world),
            shader=JACOBIAN_SHADER,
            shader_controls={"normalized": {"range": list(plan.jacobian_range)}},
            opacity=1.0)
        # Fixed and warped overlaid on the left, det J on the right, same place and zoom.
        state.layout = neuroglancer.row_layout([
            neuroglancer.LayerGroupViewer(layers=list(images), layout="xy"),
            neuroglancer.LayerGroupViewer(layers=[JACOBIAN], layout="xy"),
        ])
    return RunningViewer(url=viewer.get_viewer_url(), viewer=viewer, volumes=volumes,
                         missing=plan.missing)


def stop_viewer() -> None:
    """Stop the process's Neuroglancer server (its URLs stop answering)."""
    neuroglancer.stop()
