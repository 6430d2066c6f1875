"""Boxes of one level of an image, each stored chunk decoded once while a batch of
neighbouring work needs it.

zarr decodes every chunk a box touches whole, and a box a few voxels wider than a chunk
(what warping or downsampling one output chunk reads) touches up to 27 of them: done
chunk by chunk, each input chunk is decoded again for every output chunk that reaches
it. A `ChunkCache` keeps the decoded chunks, least recently used first out, up to a
bound in bytes, so that a batch of neighbouring output chunks decodes each input chunk
about once. Nothing is held beyond the bound: out of core stays out of core.
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import product

import numpy as np

from dreg.grid import Region
from dreg.io import ome_zarr

DEFAULT_CACHE_BYTES = 256 * 2**20


class ChunkCache:
    """Reads boxes of level `level` of `image` (as `ome_zarr.read_region`: (c, z, y, x)
    for a vector image) from whole decoded chunks kept up to `max_bytes`."""

    def __init__(self, image: ome_zarr.OmeZarrImage, level: int,
                 max_bytes: int = DEFAULT_CACHE_BYTES):
        self.image = image
        self.level = level
        self.max_bytes = max_bytes
        lv = image.level(level)
        self.shape = tuple(lv.grid.shape_zyx)
        self.chunks = tuple(lv.chunks_zyx)
        self.dtype = np.dtype(lv.dtype)
        self._kept: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._array = None  # the level's zarr array, opened at the first read
        self.decoded = 0  # chunks read from storage, for tests and profiles

    def read_region(self, region: Region) -> np.ndarray:
        """The voxels of `region` (z, y, x slices within the level)."""
        ranges = [range(s.start // c, (s.stop - 1) // c + 1)
                  for s, c in zip(region, self.chunks, strict=True)]
        wanted = list(product(*ranges))
        self._load([key for key in wanted if key not in self._kept])
        lead = () if self.image.components is None else (self.image.components,)
        out = np.empty((*lead, *(s.stop - s.start for s in region)), dtype=self.dtype)
        for key in wanted:
            chunk = self._kept[key]
            self._kept.move_to_end(key)
            starts = [k * c for k, c in zip(key, self.chunks, strict=True)]
            source = tuple(slice(max(s.start - a, 0), min(s.stop - a, c))
                           for s, a, c in zip(region, starts, self.chunks, strict=True))
            target = tuple(slice(a + p.start - s.start, a + p.stop - s.start)
                           for s, a, p in zip(region, starts, source, strict=True))
            out[(Ellipsis, *target)] = chunk[(Ellipsis, *source)]
        self._evict(keep=set(wanted))
        return out

    def _chunk_region(self, key: tuple[int, int, int]) -> Region:
        return tuple(slice(k * c, min((k + 1) * c, n))
                     for k, c, n in zip(key, self.chunks, self.shape, strict=True))

    def _load(self, missing: list[tuple[int, int, int]]) -> None:
        """Decode the missing chunks: in one read when they fill their bounding box (the
        usual case: the first box, or the next slice of chunks), else one by one."""
        if not missing:
            return
        if self._array is None:
            self._array = ome_zarr.open_level(self.image, self.level)
        lo = np.min(missing, axis=0)
        hi = np.max(missing, axis=0) + 1
        if int(np.prod(hi - lo)) == len(missing):
            box = tuple(slice(int(a) * c, min(int(b) * c, n))
                        for a, b, c, n in zip(lo, hi, self.chunks, self.shape, strict=True))
            data = ome_zarr.read_region(self.image, self.level, box, self._array)
            for key in missing:
                part = tuple(slice(r.start - b.start, r.stop - b.start) for r, b in
                             zip(self._chunk_region(key), box, strict=True))
                self._keep(key, data[(Ellipsis, *part)].copy())
        else:
            for key in missing:
                self._keep(key, ome_zarr.read_region(self.image, self.level,
                                                     self._chunk_region(key), self._array))
        self.decoded += len(missing)

    def _keep(self, key: tuple[int, int, int], chunk: np.ndarray) -> None:
        self._kept[key] = chunk
        self._bytes += chunk.nbytes

    def _evict(self, keep: set) -> None:
        """Drop the least recently used chunks beyond the bound (never those of the box
        just read: a box larger than the bound is still read whole)."""
        for key in list(self._kept):
            if self._bytes <= self.max_bytes:
                break
            if key in keep:
                continue
            self._bytes -= self._kept.pop(key).nbytes
