"""Helpers shared by test modules (test modules never import each other)."""

from __future__ import annotations

import shutil

import numpy as np

from dreg.grid import Grid
from dreg.io import storage
from dreg.registration.records import InitialRecord, RegistrationResult

# The synthetic pair of a module that sets no PAIR (conftest.pair): small, anisotropic,
# offset, with a smooth deformation and a shift (all of write_pair's features).
DEFAULT_PAIR = {"grid": Grid((24, 26, 28), (1.0, 1.2, 0.9), origin_xyz=(3.0, -2.0, 5.0)),
                "seed": 4, "amplitude_voxels": 1.5, "shift_voxels": (1.0, -1.5, 2.0),
                "chunks": 16}


def finished_registration(pair: dict, out: str) -> str:
    """OUT as a registration leaves it, with the pair's exact field as its field."""
    fs, _ = storage.filesystem(pair["truth"])
    field_uri = storage.join(out, "field.ome.zarr")
    if storage.is_s3(out):
        fs.copy(pair["truth"].removeprefix("s3://"), field_uri.removeprefix("s3://"),
                recursive=True)
    else:
        shutil.copytree(pair["truth"], field_uri)
    result = RegistrationResult(
        output=out, field=field_uri, result=storage.join(out, "result.json"),
        fixed=pair["fixed"], moving=pair["moving"], flow_run_id="made-by-the-test",
        initial=InitialRecord(matrix=np.eye(3).tolist(), translation=[0.0] * 3),
        stages=[], seconds=0.0)
    storage.write_text(result.result, result.document())
    return out


def pickles_under(root: str) -> list[str]:
    """Issue 18 item 2: files under `root` (a local folder) that are or hold a pickle, or
    lie in a Prefect result folder. Zarr chunk files (below a ``c`` folder) are raw
    array bytes and are not looked at."""
    from pathlib import Path

    found = []
    for path in Path(root).rglob("*"):
        if not path.is_file() or "c" in path.relative_to(root).parts[:-1]:
            continue
        head = path.read_bytes()[:4096]
        if (".prefect-results" in path.parts or head.startswith(b"\x80")
                or b"picklelib" in head or b'"pickle"' in head):
            found.append(str(path))
    return found
