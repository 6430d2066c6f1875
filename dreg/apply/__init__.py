"""What uses a finished field: warp images onto the fixed grid, invert the field,
transform point sets, with their plans, the outputs' bookkeeping and OUT's scene.

The submodules are imported where they are used, not here: a registration (and every
Dask worker it starts) needs only the plan and the scene, not the point tables' pandas."""
