"""`dreg register` and `dreg demo`: run the registration flow on the embedded defaults
(no server to start: Prefect's temporary API, a local Dask cluster, local files)."""

from __future__ import annotations

import argparse
import json
import os
import time

from cli.arguments import add_cluster_options, model_option, number, run_options
from dreg.io import ownership, storage
from flows.options import RunOptions

DEMO_SHAPE = (64, 80, 96)


def _run_registration(args: argparse.Namespace, pipeline, warp: bool = False):
    """The registration's result and, with `warp`, the warp's, both run on one Dask
    cluster (a local one starts once)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.children import use_temporary_server, wait_for_temporary_server

    use_temporary_server()  # comes up while the flow is imported
    from flows.cluster import dask_cluster
    from flows.registration import register_images

    wait_for_temporary_server()
    options = run_options(args, show_progress=True)
    with dask_cluster(options.dask_address, options.workers):
        result = register_images(fixed=args.fixed, moving=args.moving, out=args.out,
                                 pipeline=pipeline, options=options)
        if not warp:
            return result, None
        from flows.warp import warp_image

        return result, warp_image(result.output, options=RunOptions(
            dask_address=options.dask_address, workers=options.workers))


def _last_line(result) -> dict:
    return result.model_dump(mode="json", include={"output", "field", "flow_run_id",
                                                   "block_counts", "blocks_reused",
                                                   "failed_blocks", "failed_share",
                                                   "seconds", "qc", "qc_reason"})


def cmd_register(args: argparse.Namespace) -> int:
    from dreg.registration.pipeline import load_pipeline
    from dreg.registration.plan import plan_registration
    from dreg.registration.records import pipeline_of

    # Options, then the pipeline, then the inputs: all before anything is written.
    run_options(args, show_progress=True)
    # No --config: the built-in pipeline for the fixed image's size (the plan's).
    pipeline = load_pipeline(args.config) if args.config else None
    # Validate here first: bad input fails in a second, before a server or cluster starts.
    # No chunk is listed here: the flow fingerprints the inputs where the run starts.
    plan = plan_registration(args.fixed, args.moving, args.out, pipeline,
                             overwrite=args.overwrite, versions=False)
    ownership.check_free(plan.out_uri)
    # The stages as planned, so that the flow run's parameters in the UI show them.
    result, warped = _run_registration(args, pipeline_of(plan), warp=args.warp)
    line = _last_line(result)
    if warped:
        line["warped"] = warped.output
    print(json.dumps(line))
    return 0


def demo_pipeline():
    """A quick pipeline for the demo pair: a global affine at the coarsest level, then
    B-spline blocks at full resolution."""
    from dreg.registration.pipeline import PipelineConfig, StageConfig

    return PipelineConfig(stages=[
        StageConfig(name="affine", level=-1, transform="affine",
                    parameters={"MaximumNumberOfIterations": 200}),
        StageConfig(name="bspline", level=0, block_size=48, overlap=0.25, transform="bspline",
                    parameters={"MaximumNumberOfIterations": 150}),
    ])


def cmd_demo(args: argparse.Namespace) -> int:
    from dreg import synth
    from dreg.grid import Grid
    from dreg.qc.accuracy import field_error

    started = time.perf_counter()
    run_options(args, show_progress=True)  # checked before the pair is written
    folder = storage.normalize_uri(args.dir)
    pair = synth.write_pair(
        storage.join(folder, "pair"),
        Grid(DEMO_SHAPE, (1.0, 1.0, 1.0)),
        seed=args.seed,
        amplitude_voxels=2.0,
        shift_voxels=(1.5, -2.0, 2.5),
        overwrite=True,
    )
    args.fixed, args.moving = pair["fixed"], pair["moving"]
    args.out, args.overwrite = storage.join(folder, "registration"), True
    result, _ = _run_registration(args, demo_pipeline())
    error = field_error(result.field, pair["truth"])
    print(f"error against the truth (voxels): RMS {error['rms_before']:.3f} before, "
          f"{error['rms_after']:.3f} after; 95th percentile after {error['p95_after']:.3f}")
    print(json.dumps({**_last_line(result), "truth": pair["truth"], **error,
                      "total_seconds": round(time.perf_counter() - started, 1)}))
    return 0


def add_commands(sub) -> None:
    register = sub.add_parser("register", help="register MOVING onto FIXED into OUT")
    register.add_argument("fixed")
    register.add_argument("moving")
    register.add_argument("out")
    register.add_argument("--config", help="pipeline YAML (default: the built-in pipeline, "
                          "whose B-spline blocks are 64 voxels, or 128 past 512 blocks of 64)")
    model_option(register, "--overwrite", RunOptions, "overwrite")
    model_option(register, "--retries", RunOptions, "block_retries", type=int, metavar="N")
    model_option(register, "--storage-patience", RunOptions, "storage_patience", type=float,
                 metavar="SECONDS")
    model_option(register, "--max-failed-share", RunOptions, "max_failed_share", type=float,
                 metavar="SHARE")
    model_option(register, "--batch-size", RunOptions, "batch_size", type=int,
                 metavar="BLOCKS")
    model_option(register, "--debug", RunOptions, "debug")
    register.add_argument("--warp", action="store_true",
                          help="then warp the moving image onto the fixed grid "
                               "(OUT/warped.ome.zarr)")
    model_option(register, "--no-qc", RunOptions, "qc",
                 help="skip the quality control at the end (OUT/qc/)")
    add_cluster_options(register)
    register.set_defaults(run=cmd_register)

    demo = sub.add_parser("demo", help="make a synthetic pair, register it, print the error")
    demo.add_argument("dir", nargs="?", default="demo-out")
    demo.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0)
    add_cluster_options(demo)
    demo.set_defaults(run=cmd_demo)
