"""Validation of parameters that arrive with an event (untrusted)."""

from __future__ import annotations

import re

import pytest

from dreg.errors import InputError
from dreg.trust import check_size, output_name, validate_uri, validate_version

ALLOWED = ["s3://landing/volumes/", "/data/incoming"]


@pytest.mark.parametrize("uri, normalised", [
    ("s3://landing/volumes/a.ome.zarr", "s3://landing/volumes/a.ome.zarr"),
    ("s3://landing/volumes/sub/b.ome.zarr/", "s3://landing/volumes/sub/b.ome.zarr"),
    (" s3://landing/volumes/e.ome.zarr ", "s3://landing/volumes/e.ome.zarr"),
    ("/data/incoming/c.ome.zarr", "/data/incoming/c.ome.zarr"),
    ("/data/incoming/x/../d.ome.zarr", "/data/incoming/d.ome.zarr"),
])
def test_accepted_and_normalised(uri, normalised):
    assert validate_uri(uri, ALLOWED, "moving") == normalised


@pytest.mark.parametrize("uri, message", [
    ("s3://landing/volumesX/a.ome.zarr", "outside the allowed prefixes"),
    ("s3://other/volumes/a.ome.zarr", "outside the allowed prefixes"),
    ("s3://landing/volumes/../secrets/a", "'..' is not allowed"),
    ("s3://key:secret@landing/volumes/a", "not a valid s3:// URI"),
    ("/data/incoming/../../etc/passwd", "outside the allowed prefixes"),
    ("/data/incoming2/a.ome.zarr", "outside the allowed prefixes"),
    ("data/incoming/a.ome.zarr", "must be absolute"),
    ("http://landing/volumes/a", "scheme 'http' is not allowed"),
    ("file:///data/incoming/a", "scheme 'file' is not allowed"),
    ("", "missing"),
    ("s3://landing/volumes/" + "a" * 2000, "longer than"),
])
def test_rejected_with_a_reason(uri, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        validate_uri(uri, ALLOWED, "moving")


def test_nothing_is_allowed_without_prefixes():
    with pytest.raises(InputError, match="no allowed prefixes"):
        validate_uri("s3://landing/volumes/a", [], "moving")


def test_versions_and_sizes():
    assert validate_version("2026-11-25T10:00") == "2026-11-25T10:00"
    with pytest.raises(InputError, match="version"):
        validate_version("v1; rm -rf /")
    check_size((100, 100, 100), 10**6, "moving")
    with pytest.raises(InputError, match="more than this deployment accepts"):
        check_size((101, 100, 100), 10**6, "moving")


def test_output_names_are_readable_and_unique_per_source():
    name = output_name("s3://landing/volumes/sample 17.ome.zarr", "v1")
    assert re.fullmatch(r"sample-17-v1-[0-9a-f]{8}", name), name
    assert re.fullmatch(r"x-[0-9a-f]{8}", output_name("/data/incoming/x.zarr/", ""))
    # Same name and version in two folders: two outputs.
    assert output_name("s3://landing/a/moving.ome.zarr", "v2") != output_name(
        "s3://landing/b/moving.ome.zarr", "v2")
    assert output_name("s3://l/a/m.ome.zarr/", "v2") == output_name("s3://l/a/m.ome.zarr", "v2")


def image_with_link(root, target) -> str:
    """A local image folder under `root` whose one chunk is a link to `target`."""
    image = root / "volume.ome.zarr"
    (image / "0" / "c" / "0" / "0").mkdir(parents=True)
    (image / "zarr.json").write_text("{}")
    (image / "0" / "c" / "0" / "0" / "0").symlink_to(target)
    return str(image)


def test_a_link_out_of_the_allowed_prefixes_is_refused(tmp_path):
    """issue 18 item 7: a chunk of an event's local image linked to a file outside the
    allowed prefixes (here a secret beside them) is refused, naming the link."""
    from dreg.trust import check_links

    root = tmp_path / "incoming"
    root.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    uri = image_with_link(root, secret)
    with pytest.raises(InputError, match=r"moving: .*/0/c/0/0/0 is a link to a place outside"):
        check_links(uri, [str(root)], "moving")
    # A link to a folder outside is refused too, and a link that stays inside is fine.
    (root / "volume.ome.zarr" / "0" / "c" / "0" / "0" / "0").unlink()
    (root / "volume.ome.zarr" / "1").symlink_to(tmp_path)
    with pytest.raises(InputError, match="is a link to a place outside"):
        check_links(uri, [str(root)], "moving")
    (root / "volume.ome.zarr" / "1").unlink()
    (root / "volume.ome.zarr" / "1").symlink_to(root / "volume.ome.zarr" / "0")
    check_links(uri, [str(root)], "moving")


def test_an_event_image_with_an_escaping_link_is_rejected_before_it_is_read(tmp_path):
    """issue 18 item 7: the ingest flow's check of an event's parameters walks a local
    image for links before anything opens it."""
    from flows.ingest import validated_request

    root = tmp_path / "incoming"
    root.mkdir()
    (tmp_path / "secret.txt").write_text("password")
    uri = image_with_link(root, tmp_path / "secret.txt")
    with pytest.raises(InputError, match="is a link to a place outside"):
        validated_request(uri, "v1", "", str(root / "reference.ome.zarr"),
                          str(tmp_path / "out"), [str(root)], 10**9)


def test_credentials_in_uris_are_redacted_in_messages_and_event_resources():
    """issue 18 (bad input): user information in a URI never leaves in text: not in an
    error line, nor in the resource ids of the events a run emits."""
    from dreg.errors import first_line, one_line, redact
    from flows import events

    uri = "s3://AKIAKEY:S3CR3T@bucket/volumes/a.ome.zarr"
    assert redact(f"cannot read {uri}") == "cannot read s3://***@bucket/volumes/a.ome.zarr"
    assert "S3CR3T" not in one_line(f"{uri}\nsecond line")
    assert "S3CR3T" not in first_line(RuntimeError(f"{uri}: broken"))
    texts = [events.volume_resource_id(uri), events.failed_resource(uri, None),
             events.failed_resource(None, uri), events.failed_resource(None, None, uri),
             repr(events._related(uri, uri, uri))]
    assert all("S3CR3T" not in t and "AKIAKEY" not in t for t in texts), texts


def test_an_error_line_is_bounded():
    """issue 18 (bad input): however long the cause, the line stays short."""
    from dreg.errors import one_line

    line = one_line("cause " * 100_000)
    assert len(line) <= 1000 and "\n" not in line and "characters, cut" in line
