"""``python -m graphopt {demo,calibrate,flags,plan}``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["calibrate"]:  # its own parser: argparse's REMAINDER would reorder its options
        from graphopt.analysis.calibrate import main as calibrate_main
        return calibrate_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m graphopt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="compile the reference Llama with the passes on, check it against eager, "
                     "print what each pass did and write the dump")
    from graphopt import demo as demo_module
    demo_module.add_arguments(demo)
    calibrate = commands.add_parser(
        "calibrate", help="measure GEMM TFLOP/s and HBM/NVLink/PCIe bandwidth; write a device "
                          "profile for the planners", add_help=False)
    calibrate.add_argument("rest", nargs=argparse.REMAINDER)
    commands.add_parser("flags", help="list every config flag with its default and comment")
    # layout planner (graphopt/planning/cli.py)
    plan = commands.add_parser(
        "plan", help="choose data / tensor / sequence-parallel degrees, micro-batch and memory plan "
                     "for a model on a world; print the best layouts and why the others lost")
    from graphopt.planning import cli as plan_cli
    plan_cli.add_arguments(plan)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "calibrate":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo":
        return 0 if demo_module.run_demo(demo_module.options_from_args(args)) else 1
    if args.command == "plan":
        return plan_cli.run(args)
    if args.command == "calibrate":
        from graphopt.analysis.calibrate import main as calibrate_main
        return calibrate_main(args.rest + rest)
    from graphopt import config
    print(config.describe_flags())
    return 0


if __name__ == "__main__":
    sys.exit(main())
