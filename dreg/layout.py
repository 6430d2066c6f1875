"""The names of OUT's parts, in one place.

A registration's output OUT (a folder or an s3:// prefix) holds:

    result.json              written last: its presence means the registration is finished
    field.ome.zarr           the final displacement field (fixed → moving)
    stages/<k>-<name>/       each stage: stage.json, blocks.json, blocks/, its field
    warped.ome.zarr          the moving image warped onto the fixed grid (`dreg warp`)
    inverse.ome.zarr         the inverse field (moving → fixed, `dreg invert`)
    inverse.json             the inverse's round-trip error
    qc/                      quality control: qc.json, index.html, pictures

Everything inside OUT is named relative to OUT, so a copied or moved OUT keeps working.
"""

from __future__ import annotations

RESULT_FILE = "result.json"
FIELD_NAME = "field.ome.zarr"
STAGES_FOLDER = "stages"
STAGE_FILE = "stage.json"
BLOCK_TABLE = "blocks.json"
BLOCK_STORE = "blocks"
WARPED_NAME = "warped.ome.zarr"
INVERSE_NAME = "inverse.ome.zarr"
INVERSE_REPORT = "inverse.json"
QC_FOLDER = "qc"
QC_FILE = "qc.json"
QC_PAGE = "index.html"

# What `--overwrite` of a registration removes besides the stages: outputs derived from
# the old field, which no longer match the new one.
DERIVED = (WARPED_NAME, INVERSE_NAME, INVERSE_REPORT, QC_FOLDER)


def stage_folder_name(number: int, name: str) -> str:
    """A stage's folder under OUT/stages/: its number, then its name."""
    return f"{number}-{name}"


def field_name(identity: str) -> str:
    """A stage's field, named by its identity so that a new field never replaces one a
    reader may be using."""
    return f"field-{identity}.ome.zarr"
