"""`dreg qc`: quality control of a finished registration."""

from __future__ import annotations

import argparse
import json

from cli.arguments import add_cluster_options, run_options
from dreg.io import ownership


def cmd_qc(args: argparse.Namespace) -> int:
    from dreg.qc.plan import plan_qc
    from dreg.registration.records import load_result

    # Check first: a finished registration, readable inputs, a sane threshold (exit 2).
    plan = plan_qc(load_result(args.out), args.fold_threshold)
    ownership.check_free(plan.out)
    options = run_options(args)
    from flows.children import use_temporary_server, wait_for_temporary_server

    use_temporary_server()  # comes up while the flow is imported
    from flows.qc import quality_control

    wait_for_temporary_server()
    report = quality_control(args.out, args.fold_threshold, options)
    print(json.dumps(report.model_dump(mode="json", include={
        "output", "qc", "reason", "jacobian", "similarity", "page", "folder", "seconds",
        "flow_run_id"})))
    return 0


def add_commands(sub) -> None:
    from dreg.qc.plan import FOLD_THRESHOLD

    qc = sub.add_parser(
        "qc", help="quality control of OUT: pictures and numbers in OUT/qc/",
        description="Measure the finished registration in OUT: the Jacobian determinant of "
        "x -> x + u(x) over the whole field (folds: det J <= 0), the similarity before and "
        "after on a coarse level, the stages' block statuses and metric gains; draw slices "
        "through the centre of the foreground. Writes OUT/qc/qc.json, OUT/qc/index.html "
        "and PNG pictures, records the verdict (ok or warn) in result.json, and shows it "
        "all on the flow run in the Prefect UI. Runs at the end of every `dreg register` "
        "unless --no-qc.")
    qc.add_argument("out", help="a finished registration's output (holds result.json)")
    qc.add_argument("--fold-threshold", type=float, default=FOLD_THRESHOLD,
                    help="warn when more than this share of the field's voxels fold "
                         f"(default {FOLD_THRESHOLD:g}, i.e. {FOLD_THRESHOLD * 100:g} %%)")
    add_cluster_options(qc)
    qc.set_defaults(run=cmd_qc)
