"""dreg: distributed, out-of-core registration of large 3D images.

The core library, by area (no Prefect anywhere in it):

- `dreg.io`: storage (local, S3), OME-Zarr read/write, convert, pyramid, leases
- `dreg.field`: the displacement-field contract, sampling, the trilinear kernels
- `dreg.registration`: pipeline model, plan, tiling, elastix, one block's registration,
  the block store, the reduce
- `dreg.apply`: what uses a finished field: warp, invert, points
- `dreg.qc`: measures of a result's quality

Top-level modules: `layout` (the names of OUT's parts), `grid` (physical space,
regions, axis order), `errors`, `synth` (synthetic pairs with an exact truth), `trust`
(validating untrusted parameters), `memory` (process memory settings), `compiled`
(Numba's jit with the project's settings).
"""
