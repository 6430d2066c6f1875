"""The one completion convention (dreg.io.completion): an output is complete for the
identity it was marked with, written last; starting over clears the mark."""

from __future__ import annotations

from dreg.grid import Grid
from dreg.io import completion, ome_zarr, storage


def _create(uri: str):
    def create(attributes: dict) -> None:
        ome_zarr.create_image(uri, [Grid((4, 4, 4), (1.0, 1.0, 1.0))], "uint8", chunks=4,
                              dreg_attributes=attributes, overwrite=True)
    return create


def test_zarr_output_is_complete_only_for_its_identity_once_marked(tmp_path):
    uri = str(tmp_path / "out.ome.zarr")
    assert not completion.is_complete(uri)  # absent
    token = completion.start(uri, "a", _create(uri))
    assert not completion.is_complete(uri, "a")  # started, not finished
    completion.mark_complete(uri, "a", {"summary": {"chunks": 1}})
    assert completion.is_complete(uri, "a") and completion.is_complete(uri)
    assert not completion.is_complete(uri, "b")
    assert completion.record(uri)["summary"] == {"chunks": 1}
    # A resumed run for the same inputs keeps the output and its token, unmarked.
    assert completion.start(uri, "a", _create(uri)) == token
    assert not completion.is_complete(uri, "a")
    # Other inputs: a new incarnation with a new token.
    completion.mark_complete(uri, "a")
    assert completion.start(uri, "b", _create(uri)) != token
    assert not completion.is_complete(uri)
    assert completion.record(uri)["inputs"] == "b"


def test_a_field_marked_by_an_earlier_dreg_reads_as_complete_until_cleared(tmp_path):
    uri = str(tmp_path / "field.ome.zarr")
    _create(uri)({})
    ome_zarr.update_attributes(uri, {"identity": "old"})  # the mark before this convention
    assert completion.is_complete(uri, "old")
    assert not completion.is_complete(uri, "new")
    completion.clear(uri)
    assert not completion.is_complete(uri)


def test_unreadable_output_is_not_complete(tmp_path):
    (tmp_path / "junk.ome.zarr").mkdir()
    assert not completion.is_complete(str(tmp_path / "junk.ome.zarr"))
    assert completion.record(str(tmp_path / "junk.ome.zarr")) is None


def test_file_output_is_complete_once_written_whole(tmp_path):
    uri = str(tmp_path / "result.json")
    assert not completion.file_is_complete(uri)
    completion.write_whole(uri, "{}")
    assert completion.file_is_complete(uri)
    completion.write_whole(uri, '{"qc": "ok"}', replace=True)
    assert storage.read_text(uri) == '{"qc": "ok"}'


def test_parts_folder_is_resumed_for_the_same_inputs_only(tmp_path):
    folder = str(tmp_path / "points.csv.parts")
    token = completion.start_parts(folder, "a")
    part = tmp_path / "points.csv.parts" / "000000.parquet"
    part.write_bytes(b"x")
    assert completion.start_parts(folder, "a") == token and part.exists()
    assert completion.start_parts(folder, "b") != token
    assert not part.exists()


def test_a_marked_chunk_is_never_computed_again_and_a_bad_mark_is_a_miss(tmp_path):
    """Issue 18 item 2: resume state is the output's own JSON chunk marks, keyed by its
    token; a mark that is not a JSON object (a pickle, say) is never loaded, only redone."""
    folder, token, calls = str(tmp_path / "out.ome.zarr"), "0" * 32, []

    def compute() -> dict:
        calls.append(1)
        return {"voxels": 8, "max": float("nan")}

    assert completion.once(folder, token, "0-3", compute)["voxels"] == 8
    assert completion.once(folder, token, "0-3", compute)["voxels"] == 8
    assert len(calls) == 1  # the second call found the mark
    assert completion.once(folder, "1" * 32, "0-3", compute) and len(calls) == 2  # new token
    mark = completion.chunk_mark(folder, token, "0-3")
    storage.write_bytes(mark, b"\x80\x04\x95junk.")  # not JSON: a miss, recomputed
    assert completion.chunk_result(folder, token, "0-3") is None
    completion.once(folder, token, "0-3", compute)
    assert len(calls) == 3


def test_a_parts_folder_dreg_did_not_start_is_refused_not_emptied(tmp_path):
    """Issue 18 item 3: a folder where a points output's parts would go is removed only
    when it is a parts folder dreg started."""
    import pytest

    from dreg.errors import InputError

    folder = tmp_path / "points.csv.parts"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="points.csv.parts"):
        completion.start_parts(str(folder), "a")
    assert (folder / "notes.txt").read_text() == "mine"
