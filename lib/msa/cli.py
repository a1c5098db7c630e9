"""The `msa` command line. User mistakes print one line and exit with code 2."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import MSAError


def _cmd_params(args: argparse.Namespace) -> int:
    from .modeling.build import build_model
    from .modeling.msa import count_parameters

    model = build_model(args.backbone, three_d=args.three_d, pretrained=False)
    counts = count_parameters(model)
    if args.json:
        print(json.dumps(counts))
    else:
        print(f"{args.backbone}{' 3D' if args.three_d else ''}: {counts['trainable']:,} of {counts['total']:,} "
              f"parameters trainable ({100 * counts['trainable_fraction']:.2f}%)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .modeling.build import BACKBONES

    parser = argparse.ArgumentParser(prog="msa", description="Medical SAM Adapter: interactive medical segmentation")
    commands = parser.add_subparsers(dest="command", required=True)

    params = commands.add_parser("params", help="count total and trainable parameters of a backbone with adapters")
    params.add_argument("--backbone", default="lite_medsam", choices=sorted(BACKBONES))
    params.add_argument("--three-d", action="store_true", help="with the 3D depth branch")
    params.add_argument("--json", action="store_true", help="print JSON")
    params.set_defaults(func=_cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MSAError as exc:
        print(f"msa {args.command}: error: {exc}", file=sys.stderr)
        return 2


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
