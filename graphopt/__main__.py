"""``python -m graphopt {demo,calibrate,flags,plan}`` (also installed as the ``graphopt`` command)."""

from __future__ import annotations

import argparse
import sys


def _calibration_scope() -> str:
    """What ``calibrate`` can measure on the devices this process sees, and what stays a default."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        return ("no CUDA GPU visible: measuring this CPU's GEMM throughput (bf16, fp32) and memory "
                "copy bandwidth only. Host <-> device (PCIe), peer-to-peer (NVLink) and all-reduce "
                "bandwidth need GPUs: the profile keeps built-in defaults for them. A CPU profile "
                "only makes CPU test runs plan with this machine's relative costs; run calibrate on "
                "the GPU machine you train on.")
    if gpus == 1:
        return ("one CUDA GPU visible: measuring GEMM throughput, HBM and host <-> device "
                "bandwidth. Peer-to-peer and all-reduce bandwidth need two GPUs of one host: the "
                "profile keeps built-in defaults for them.")
    return (f"{gpus} CUDA GPUs visible: measuring GEMM throughput, HBM, host <-> device, "
            "peer-to-peer (GPUs 0 and 1) and all-reduce (every visible GPU) bandwidth.")


def _run_calibrate(argv: list[str]) -> int:
    from graphopt.measure.calibrate import main as calibrate_main
    if not any(arg in ("-h", "--help") for arg in argv):
        print(f"calibrate: {_calibration_scope()}", flush=True)
    return calibrate_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # calibrate owns its options (--out, --quick): hand them over untouched, so that
    # `calibrate --out profile.json` parses exactly as `calibrate --help` documents it.
    if argv[:1] == ["calibrate"]:
        return _run_calibrate(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m graphopt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="compile the reference Llama with the passes on, check it against eager, "
                     "print what each pass did and write the dump")
    from graphopt import demo as demo_module
    demo_module.add_arguments(demo)
    commands.add_parser(
        "calibrate", help="measure GEMM TFLOP/s and HBM/NVLink/PCIe bandwidth; write a device "
                          "profile for the planners (`calibrate --help` for its options)")
    commands.add_parser("flags", help="list every config flag with its default and comment")
    # layout planner (graphopt/planning/cli.py)
    plan = commands.add_parser(
        "plan", help="choose data / tensor / sequence-parallel degrees, micro-batch and memory plan "
                     "for a model on a world; print the best layouts and why the others lost")
    from graphopt.planning import cli as plan_cli
    plan_cli.add_arguments(plan)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return 0 if demo_module.run_demo(demo_module.options_from_args(args)) else 1
    if args.command == "plan":
        return plan_cli.run(args)
    from graphopt import config
    print(config.describe_flags())
    return 0


if __name__ == "__main__":
    sys.exit(main())
