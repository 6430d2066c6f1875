"""`dreg emit-ingested`: announce a new volume to the deployments. An ingestion system
runs it for every volume it lands, so it imports neither Prefect (with PREFECT_API_URL
in the environment) nor the image libraries: 0.07 CPU-s a call, 15 times less than
Prefect's own client (bench/emit.py)."""

from __future__ import annotations

import argparse
import json

from dreg.errors import redact
from dreg.trust import check_form, check_s3_uri, is_s3, validate_version


def cmd_emit_ingested(args: argparse.Namespace) -> int:
    from flows.events import configured_api, confirm_delivered, emit_ingested

    # What the registration would refuse whatever its allowed prefixes, refused here
    # before anything is sent.
    for label, uri in (("uri", args.uri), ("--fixed", args.fixed)):
        if uri is not None:
            if is_s3(uri):
                check_s3_uri(uri)  # a bucket, and no credentials to spread
            check_form(uri, f"{label} {redact(uri)}")
    validate_version(args.version)
    event = emit_ingested(args.uri, version=args.version, fixed=args.fixed)
    confirm_delivered(configured_api(), event["id"])
    print(json.dumps({"event": event["event"], "id": event["id"],
                      "resource": event["resource"]["prefect.resource.id"],
                      "occurred": event["occurred"]}))
    return 0


def add_commands(sub) -> None:
    emit = sub.add_parser("emit-ingested",
                          help="announce a new volume (the ingestion event) to Prefect")
    emit.add_argument("uri", help="the new volume (s3:// URI or local path)")
    emit.add_argument("--version", default="", help="the volume's version label")
    emit.add_argument("--fixed", default=None, help="register onto this volume instead of "
                      "the deployment's reference")
    emit.set_defaults(run=cmd_emit_ingested)
