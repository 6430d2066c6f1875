"""Run `dreg` commands in this process and report the growth of peak memory.

    python tests/peak_rss.py WARM_ARGS -- ARGS

Runs the CLI with WARM_ARGS first (the same command on a tiny input, so that every
module, library and thread pool the command uses is loaded), records the peak resident
set size so far as the baseline, then runs ARGS and prints one JSON line:
{"baseline_mb": ..., "peak_mb": ..., "growth_mb": ..., "seconds": ...}.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def peak_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str]) -> int:
    split = argv.index("--")
    warm, args = argv[:split], argv[split + 1 :]
    from cli import main as cli

    with open("/dev/null", "w") as sink:
        stdout, sys.stdout = sys.stdout, sink
        try:
            if cli.main(warm) != 0:
                return 1
            baseline = peak_mb()
            start = time.monotonic()
            status = cli.main(args)
            seconds = time.monotonic() - start
        finally:
            sys.stdout = stdout
    peak = peak_mb()
    report = {
        "status": status,
        "baseline_mb": round(baseline, 1),
        "peak_mb": round(peak, 1),
        "growth_mb": round(peak - baseline, 1),
        "seconds": round(seconds, 2),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
