"""dreg: distributed, out-of-core registration of large 3D images.

The core library, by area (no Prefect anywhere in it):

- `dreg.io`: storage (local, S3), OME-Zarr read/write, convert, pyramid
- `dreg.registration`: pipeline model, plan, tiling, elastix, one block's registration
- `dreg.transform`: the displacement-field contract and sampling, the reduce
- `dreg.qc`: measures of a result's quality

Top-level modules: `grid` (physical space, regions, axis order), `errors`, `synth`
(synthetic pairs with an exact truth), `trust` (validating untrusted parameters),
`memory` (process memory settings).
"""
