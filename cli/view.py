"""`dreg view`: look at a finished registration in a web viewer (Neuroglancer)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from cli.arguments import number


def _interrupt(signum, frame) -> None:
    # SIGTERM stops the viewer as Ctrl-C does: the same clean-up, the same exit status.
    raise KeyboardInterrupt


def cmd_view(args: argparse.Namespace) -> int:
    from dreg.qc import viewer, viewer_record

    plan = viewer.plan_view(args.out)  # not a finished OUT: one line, exit 2
    previous = signal.signal(signal.SIGTERM, _interrupt)
    record = None
    try:
        running = viewer.start_viewer(plan, args.port)
        try:
            record = viewer_record.write_record(plan.out, running.url)
        except OSError as exc:  # the viewer works; only the QC page cannot find it
            print(f"dreg: note: the viewer is not recorded for the QC page ({exc})",
                  file=sys.stderr)
        for missing in running.missing:
            print(f"dreg: note: layer {missing}", file=sys.stderr)
        print(running.url, flush=True)
        print(json.dumps({"out": plan.out, "url": running.url, "layers": list(running.volumes),
                          "missing": running.missing}), flush=True)
        while True:  # serve until Ctrl-C (SIGINT) or SIGTERM
            time.sleep(3600)
    finally:
        viewer.stop_viewer()
        if record is not None:
            viewer_record.remove_record(record)
        signal.signal(signal.SIGTERM, previous)


def add_commands(sub) -> None:
    view = sub.add_parser(
        "view", help="look at OUT in a web viewer: fixed, warped and det J (Neuroglancer)",
        description="Serve the fixed image, the warped image (OUT/warped.ome.zarr, from "
        "`dreg warp`) and det J of the field as Neuroglancer layers, placed in physical "
        "space, read chunk by chunk as the browser asks. Listens on 127.0.0.1 only and "
        "prints the URL to open, then one JSON line; runs until Ctrl-C. A missing warped "
        "image is left out, with a note saying how to make it.")
    view.add_argument("out", help="a finished registration's output (holds result.json)")
    view.add_argument("--port", type=number(int, 0, 65535), default=0,
                      help="the port on 127.0.0.1 (default 0: any free port)")
    view.set_defaults(run=cmd_view)
