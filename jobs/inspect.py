"""python -m jobs.inspect FILE.onnx: print every input and output of an ONNX graph."""

from __future__ import annotations

import argparse
import json
import sys

from embedder.infer.graph_info import read_graph_info
from jobs._cli import run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.inspect",
        description="Print the inputs and outputs of any ONNX graph: name, element type, shape (symbolic axes by name).",
    )
    parser.add_argument("graph", help="path to a .onnx file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table, for scripts")
    args = parser.parse_args(argv)

    def inspect() -> int:
        info = read_graph_info(args.graph)
        if args.json:
            print(json.dumps(info.to_dict(), indent=2))
            return 0
        print(f"graph: {args.graph} (opset {info.opset})")
        for title, tensors in (("inputs", info.inputs), ("outputs", info.outputs)):
            print(f"{title}:")
            for tensor in tensors:
                print(f"  {tensor}")
        return 0

    return run_main("jobs.inspect", inspect)


if __name__ == "__main__":
    sys.exit(main())
