"""Headline figure: how fast a 128^3 region of an OME-Zarr image reads, locally and on S3.

    .venv/bin/python bench/read_region.py [--repeats N] [--size 256]

Writes a 256^3 float32 synthetic image with 64^3 chunks to a temporary folder and the
same chunks to a moto S3 server this script starts on a free loopback port, then reads a
128^3 region that is not aligned to the chunks (so it touches 27 chunks, as a padded
registration block does) from each, N times. --size scales the image, its chunks and the
region together. Prints progress (stderr), then one JSON line: {"local_mb_per_s",
"s3_mb_per_s", "local_s", "s3_s", ...}, times being medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))  # the moto server helper the tests use

import s3_server  # noqa: E402
from _common import emit  # noqa: E402
from _common import log as progress  # noqa: E402

from dreg import synth  # noqa: E402
from dreg.grid import Grid  # noqa: E402
from dreg.io import ome_zarr  # noqa: E402

SIZE = 256
CHUNK = 64
REGION_START = (37, 51, 90)  # a 128^3 region from here touches 27 chunks
REGION_EDGE = 128


def scaled(size: int) -> tuple[int, tuple[slice, ...]]:
    """Chunk edge and region for an image of size^3: everything scaled by size / 256."""
    chunk = max(1, CHUNK * size // SIZE)
    region = tuple(slice(s * size // SIZE, (s + REGION_EDGE) * size // SIZE)
                   for s in REGION_START)
    return chunk, region


def write_image(uri: str, grid: Grid, chunk: int, chunks_from=None) -> ome_zarr.OmeZarrImage:
    """The synthetic fixed image at `uri`; chunks computed, or copied from another image."""
    image = ome_zarr.create_image(uri, [grid], "float32", chunks=chunk, overwrite=True)
    if chunks_from is None:
        model = synth.make_model(grid, seed=0)
        compute = lambda region: synth.fixed_region(model, grid, region)  # noqa: E731
    else:
        compute = lambda region: ome_zarr.read_region(chunks_from, 0, region)  # noqa: E731
    ome_zarr.write_level_by_chunks(image, 0, compute, workers=2)
    return ome_zarr.open_image(uri)


def time_reads(image: ome_zarr.OmeZarrImage, region: tuple[slice, ...],
               repeats: int) -> tuple[list[float], np.ndarray]:
    seconds = []
    data = None
    for k in range(repeats):
        start = time.perf_counter()
        data = ome_zarr.read_region(image, 0, region)
        seconds.append(time.perf_counter() - start)
        progress(f"  read {k + 1}/{repeats}: {seconds[-1]:.3f} s")
    return seconds, data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=SIZE, help="image edge, voxels")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    grid = Grid((args.size,) * 3, (1.0, 1.0, 1.0))
    chunk, region = scaled(args.size)
    edge = region[0].stop - region[0].start
    region_mb = np.prod([s.stop - s.start for s in region]) * 4 / 2**20

    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dreg-bench-", dir=args.dir) as folder:
        progress(f"writing a {args.size}^3 float32 image with {chunk}^3 chunks to {folder}")
        local = write_image(str(Path(folder) / "image.ome.zarr"), grid, chunk)
        with s3_server.running(bucket="dreg-bench") as server:
            progress(f"copying it to {server.uri('image.ome.zarr')} at {server.endpoint_url}")
            remote = write_image(server.uri("image.ome.zarr"), grid, chunk, chunks_from=local)
            progress(f"reading a {edge}^3 region ({region_mb:.1f} MiB, 27 chunks), "
                     f"{args.repeats} times")
            progress("local:")
            local_s, local_data = time_reads(local, region, args.repeats)
            progress("s3 (moto server on loopback):")
            s3_s, s3_data = time_reads(remote, region, args.repeats)
    if not np.array_equal(local_data, s3_data):
        progress("error: the S3 region differs from the local one")
        return 1

    local_median, s3_median = statistics.median(local_s), statistics.median(s3_s)
    emit({
        "local_mb_per_s": round(region_mb / local_median, 1),
        "s3_mb_per_s": round(region_mb / s3_median, 1),
        "local_s": round(local_median, 4),
        "s3_s": round(s3_median, 4),
        "region_mib": round(float(region_mb), 1),
        "chunks_touched": 27,
        "size": args.size,
        "repeats": args.repeats,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
