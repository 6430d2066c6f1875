"""`dreg view`: look at a finished registration in a web viewer (Neuroglancer)."""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import threading
import time

from cli.arguments import number

# Python runs signal handlers in the main thread only, when it next runs: a signal that
# the kernel hands to one of the server's threads waits for the main thread's sleep to
# end, so the main thread sleeps in short ticks.
TICK_S = 0.5
# Ctrl-C must end the command even if the server's own stop does not return.
STOP_TIMEOUT_S = 10.0


def _interrupt(signum, frame) -> None:
    # SIGTERM stops the viewer as Ctrl-C does: the same clean-up, the same exit status.
    raise KeyboardInterrupt


def _stop_within(stop, seconds: float) -> bool:
    """Run `stop` in a thread; whether it returned within `seconds`. When it did not,
    every thread's stack goes to stderr, to show where the server waits."""
    stopper = threading.Thread(target=stop, name="stop-viewer", daemon=True)
    stopper.start()
    stopper.join(seconds)
    if not stopper.is_alive():
        return True
    print(f"dreg: note: the viewer's server did not stop within {seconds:g} s; "
          "its threads:", file=sys.stderr)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    return False


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
            time.sleep(TICK_S)
    finally:
        if record is not None:
            viewer_record.remove_record(record)
        signal.signal(signal.SIGTERM, previous)
        stopped = _stop_within(viewer.stop_viewer, STOP_TIMEOUT_S)
        if not stopped and isinstance(sys.exc_info()[1], KeyboardInterrupt):
            # The server's threads would hold the interpreter's exit: leave without them.
            print("dreg: interrupted", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(130)


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
