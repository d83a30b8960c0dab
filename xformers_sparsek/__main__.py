"""Command line: ``python -m xformers_sparsek {info,demo} ...``."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xformers_sparsek",
        description="SparseK attention for xFormers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="versions, GPU, and which backends are available")
    demo = sub.add_parser("demo", help="run the demo (arguments are passed through; "
                                       "`demo --help` for its options)", add_help=False)
    demo.add_argument("args", nargs=argparse.REMAINDER)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:
        # Hand everything after `demo` over verbatim: argparse.REMAINDER in a subparser
        # rejects a leading option (`demo --help`, `demo --seq 4096`).
        ns = argparse.Namespace(command="demo", args=argv[1:])
    else:
        ns = parser.parse_args(argv)

    if ns.command == "info":
        from . import _info

        _info.info()
        return 0
    if ns.command == "demo":
        from . import demo as demo_mod  # imported lazily: it pulls torch/xformers

        rc = demo_mod.main(ns.args)
        return rc if isinstance(rc, int) else 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
