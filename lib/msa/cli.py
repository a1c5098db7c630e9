"""The `msa` command line. User mistakes print one line and exit with code 2."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import MSAError
from .names import BACKBONE_NAMES, PRECISIONS, PROTOCOLS, RUNTIMES


def _cmd_params(args: argparse.Namespace) -> int:
    if args.checkpoint:  # what a file holds (msa.checkpoint.describe_checkpoint), no model built
        from .checkpoint import describe_checkpoint

        info = describe_checkpoint(args.checkpoint)
        if args.json:
            print(json.dumps(info))
            return 0
        yes_no = {True: "yes", False: "no"}
        rel_pos = {None: "none", True: "all zero", False: "non-zero"}[info["rel_pos_zero"]]
        print(f"{info['file']}: layout {info['layout']}, {info['tensors']} tensors, {info['parameters']:,} parameters")
        print(f"  image size {info['image_size'] or 'not in the weights'}; relative-position tables {rel_pos}; "
              f"adapters {yes_no[info['adapters']]}; depth adapters {yes_no[info['depth_adapters']]}")
        if "metadata" in info:
            meta = info["metadata"]
            print(f"  adapters for {meta['backbone']}{' 3D' if meta['three_d'] else ''} "
                  f"(backbone sha256 {meta['backbone_sha256'][:12]})")
            if meta.get("targets"):
                print(f"  target names (--text): {', '.join(meta['targets'])}")
        if info["layout"] == "reference-msa":
            print("  --checkpoint refuses it: the reference MSA code computes differently (see the README)")
        return 0

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


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (`msa CMD: error: ...`) and exit code 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse_point(text: str) -> tuple[tuple[float, float, float], bool]:
    parts = [p.strip() for p in text.split(",")]
    sign = parts.pop() if len(parts) == 4 else "+"
    if len(parts) != 3 or sign not in ("+", "-"):
        raise MSAError(f"--point {text!r}: expected i,j,k,+ or i,j,k,-")
    try:
        return tuple(float(p) for p in parts), sign == "+"
    except ValueError:
        raise MSAError(f"--point {text!r}: i, j and k must be numbers") from None


def _parse_roi(text: str) -> list[float]:
    try:
        roi = [float(p) for p in text.split(",")]
    except ValueError:
        raise MSAError(f"--roi {text!r}: expected six numbers i0,i1,j0,j1,k0,k1") from None
    if len(roi) != 6:
        raise MSAError(f"--roi {text!r}: expected six numbers i0,i1,j0,j1,k0,k1")
    return roi


def _engine(args: argparse.Namespace):
    """The model the options name: backbone, checkpoint, adapters (default: the shipped ones)."""
    from .engine import Engine
    from .modeling.build import build_model, default_adapters

    adapters = None if args.no_adapters else (args.adapters or default_adapters(args.backbone, args.three_d))
    model = build_model(args.backbone, checkpoint=args.checkpoint, adapters=adapters, three_d=args.three_d,
                        device=args.device)
    return Engine(model, progress=True, store=_store(args), encoder=_encoder(args, model))


def _encoder(args: argparse.Namespace, model):
    """The encoder runtime of --runtime / --precision; PyTorch for commands without them (pretraining
    changes the encoder's weights at every step, and an export is per weights)."""
    from .runtime import make_encoder

    return make_encoder(model, getattr(args, "runtime", "torch"), getattr(args, "precision", "fp32"))


def _store(args: argparse.Namespace):
    """The feature store of --cache-dir (or $MSA_CACHE_DIR), if any."""
    import os

    from .store import FeatureStore

    folder = args.cache_dir or os.environ.get("MSA_CACHE_DIR")
    return FeatureStore(folder) if folder else None


def _cmd_segment(args: argparse.Namespace) -> int:
    from .io import load_image, save_labels
    from .session import Session

    prompts = [_parse_point(p) for p in args.point]
    roi = _parse_roi(args.roi) if args.roi else None
    walk = walk_settings(args)
    if not prompts and roi is None:
        raise MSAError("give at least one --point or an --roi")
    volume = load_image(args.image, modality=args.modality)
    session = Session(_engine(args), volume, **walk)
    session.set_target(args.text, label=args.label)
    if roi is not None:
        session.add_roi(roi, label=args.label, propagate=not args.no_propagate)
    for ijk, positive in prompts:
        session.add_point(ijk, positive=positive, label=args.label, propagate=not args.no_propagate)
    labels = session.label_map()
    save_labels(labels, volume, args.output)
    print(f"wrote {args.output}: label {args.label}, {int((labels == args.label).sum())} voxels "
          f"on {int((labels == args.label).any(axis=(1, 2)).sum())} slices")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .data import parse_source
    from .evaluate import evaluate, markdown_table

    walk = walk_settings(args)
    source = parse_source(args.data, split=args.split, labels=args.labels)
    report = Path(args.report) if args.report else None
    summary = evaluate(_engine(args), source, args.prompt, noc=args.noc, report_dir=report, named=args.named,
                       walk=walk)
    print(json.dumps(summary, indent=1) if args.json else markdown_table(summary))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import latency
    from .data import sample_ct
    from .io import load_image, load_labels

    if args.image:
        volume, reference = load_image(args.image), None
    else:
        image, labels = sample_ct()
        volume = load_image(image)
        reference = load_labels(labels, volume)
    engine = _engine(args)
    engine.progress = False
    if args.name == "runtime":
        from .bench import runtime_comparison
        from .runtime import bf16_supported

        if reference is None:
            raise MSAError("msa bench runtime scores masks against labels: run it on the sample CT (no IMAGE)")
        runtimes = [("openvino", "fp32")] + ([("openvino", "bf16")] if bf16_supported() else [])
        result = runtime_comparison(engine.model, volume, reference, runtimes)
    else:
        result = latency(engine, volume, reference, clicks=args.clicks)
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


def _parse_scales(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise MSAError(f"--scales takes comma-separated numbers, got {text!r}") from None


def _cmd_train(args: argparse.Namespace) -> int:
    from .data import parse_source
    from .trainers import TrainConfig, init_distributed, selection_score, train

    init_distributed()
    if args.precision != "fp32":  # training reads its encoder features from a feature store: fp32 only
        raise MSAError(f"msa train --precision {args.precision}: training keeps its encoder features in a "
                       "feature store, which holds fp32 only")
    # Every source is parsed and checked (files, options, label names) before a model is built.
    sources = [parse_source(spec, split=args.split or "training", labels=args.labels) for spec in args.data]
    val_sources = [parse_source(spec, split="validation", labels=args.val_labels or args.labels) for spec in args.val]
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         eval_every=args.eval_every, train_encoder=args.train_encoder,
                         encoder_blocks=args.encoder_blocks, scales=_parse_scales(args.scales),
                         val_per_structure=args.val_per_structure, target_probability=args.target_probability,
                         targets_only=args.targets_only, depth_only=args.depth_only,
                         slab_box_probability=args.slab_box_probability,
                         **{k: v for k, v in (("box_probability", args.box_probability),
                                              ("box_click_probability", args.box_click_probability)) if v is not None})
    import torch

    from .checkpoint import load_adapters
    from .engine import Engine
    from .modeling.build import build_model

    torch.manual_seed(args.seed)  # random-weight backbones (tests) must be the same on every rank
    # Start from the backbone alone unless told to continue some adapters (a 2D file may start a 3D model).
    model = build_model(args.backbone, checkpoint=args.checkpoint, three_d=args.three_d, device=args.device)
    if args.adapters:
        load_adapters(model, args.adapters, allow_2d=True)
    # The runtime encodes the frozen trunks up front (msa.store); the trained blocks run in PyTorch.
    engine = Engine(model, progress=True, store=_store(args), encoder=_encoder(args, model))
    teacher = None
    if args.box_teacher:  # the 2D backbone alone (its depth branch would add nothing): box-only samples learn its answer
        torch.manual_seed(args.seed)
        teacher = build_model(args.backbone, checkpoint=args.checkpoint, device=args.device)
    stats = train(engine, sources, args.out, config, val_sources=val_sources or None, resume=not args.restart,
                  teacher=teacher)
    best = max(stats["history"], key=selection_score) if stats["history"] else {}
    line = json.dumps({"adapters": stats["adapters"], "steps": stats["steps"], "best": best, "rank": stats["rank"],
                       "trainable_sha256": stats["trainable_sha256"], "encoded_slices": stats["encoded_slices"]})
    sys.stdout.write(line + "\n")  # one write: under torchrun, ranks share stdout and must not interleave
    sys.stdout.flush()
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .io import list_images, load_image
    from .trainers.pretrain import PretrainConfig, pretrain

    paths = [image for item in args.images for image in list_images(Path(item))]  # DICOM by content, too
    if not paths:
        raise MSAError("no images to pretrain on")
    volumes = [load_image(p) for p in paths]
    objectives = tuple(o.strip() for o in args.objectives.split(",") if o.strip())
    config = PretrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            objectives=objectives)
    args.no_adapters = not args.adapters
    import torch

    torch.manual_seed(args.seed)  # as in train: a random-weight backbone is rebuilt identically
    result = pretrain(_engine(args), volumes, args.out, config)
    print(json.dumps(result))
    return 0


def _model_options(parser: argparse.ArgumentParser, runtime: bool = False) -> None:
    parser.add_argument("--backbone", default="lite_medsam", choices=sorted(BACKBONE_NAMES))
    parser.add_argument("--checkpoint", help="backbone weights file (default for lite_medsam: the bundled one)")
    parser.add_argument("--adapters", help="adapter file (default: the adapters shipped for the backbone)")
    parser.add_argument("--no-adapters", action="store_true", help="the backbone alone (zero adapters)")
    parser.add_argument("--three-d", action="store_true", help="3D depth branch: encode slabs of slices together")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--cache-dir", help="keep encoder features of every slice here and reuse them "
                                            "(default: $MSA_CACHE_DIR, else none)")
    if runtime:
        parser.add_argument("--runtime", default="auto", choices=RUNTIMES,
                            help="where the image encoder runs (default auto: openvino on a CPU, torch on CUDA); "
                                 "openvino exports are kept in $MSA_EXPORT_DIR, else ~/.cache/msa/openvino")
        parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                            help="encoder precision with openvino (default fp32, exact; bf16 where the CPU has it)")


def add_walk_options(parser: argparse.ArgumentParser) -> None:
    """How propagation walks away from the prompted slices (msa.session.Walk); unset: the model's own."""
    parser.add_argument("--margin", type=int, metavar="N",
                        help="voxels added around a neighbour's mask for the next slice's box (default: the model's)")
    parser.add_argument("--stop-iou", type=float, metavar="X",
                        help="a walk without an ROI ends below this predicted IoU (default: the model's)")
    parser.add_argument("--stop-area", type=float, metavar="F", help="... or where its mask is smaller than this "
                        "fraction of the walk's largest mask (default: the model's)")
    parser.add_argument("--stop-overlap", type=float, metavar="D", help="... or where its mask overlaps its "
                        "neighbour's by a Dice below this (default: the model's)")


def walk_settings(args: argparse.Namespace) -> dict:
    """The walk options given (add_walk_options), as msa.session.Session's keywords; MSAError for a value
    out of range, before anything is loaded."""
    from .session import ADAPTERS_WALK, Walk

    given = {key: getattr(args, key) for key in Walk._fields if getattr(args, key) is not None}
    ADAPTERS_WALK._replace(**given).checked()
    return given


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="msa", description="Medical SAM Adapter: interactive medical segmentation")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    segment = commands.add_parser("segment", help="segment an image from clicks and/or an ROI, write a label file")
    segment.add_argument("image", help="NIfTI / NRRD file, DICOM series folder, or PNG / JPEG")
    segment.add_argument("-o", "--output", required=True, help="label file to write (.nii.gz, .nrrd, .png ...)")
    segment.add_argument("--point", action="append", default=[], metavar="i,j,k,+|-",
                         help="a click in voxel indices; + positive (default), - negative; repeatable")
    segment.add_argument("--roi", metavar="i0,i1,j0,j1,k0,k1", help="a 3D box in voxel indices (k0 == k1: 2D box)")
    segment.add_argument("--label", type=int, default=1, help="label value written (default 1)")
    segment.add_argument("--text", metavar="NAME", help="name the structure (\"liver\", \"brain\"): one of the "
                                                       "adapters' target names (msa params --checkpoint ADAPTERS)")
    segment.add_argument("--modality", choices=["ct", "mr", "rgb"], help="intensity preset (default: detected)")
    segment.add_argument("--no-propagate", action="store_true", help="segment the prompted slices only")
    add_walk_options(segment)
    _model_options(segment, runtime=True)
    segment.set_defaults(func=_cmd_segment)

    evaluate = commands.add_parser("eval", help="Dice / IoU / HD95 under a prompting protocol")
    evaluate.add_argument("data", help="IMAGE:LABELS, a folder of pairs, or an MSD-style datalist JSON, with "
                                       "options DATA::key=value... (cases=18-23, axes=i, whole=NAME, ...)")
    evaluate.add_argument("--prompt", default="box", choices=PROTOCOLS)
    evaluate.add_argument("--labels", help="comma-separated label names or ids (default: all present)")
    evaluate.add_argument("--split", help="datalist key (default: validation if present, else training)")
    evaluate.add_argument("--noc", action="store_true", help="also NoC@85 / NoC@90 (click protocols)")
    evaluate.add_argument("--named", action="store_true",
                          help="every prompt also names its structure (adapters with target prompts)")
    evaluate.add_argument("--report", metavar="DIR", help="write report.md and overlay PNGs here")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    add_walk_options(evaluate)
    _model_options(evaluate, runtime=True)
    evaluate.set_defaults(func=_cmd_eval)

    trainer = commands.add_parser("train", help="fine-tune the adapters with simulated clicks and boxes")
    trainer.add_argument("data", nargs="+", help="training sources: IMAGE:LABELS, a folder of pairs or an MSD-style "
                                                 "datalist JSON, each with options DATA::key=value... "
                                                 "(cases, labels, whole, names, preset, axes, stride, weight)")
    trainer.add_argument("--out", required=True, help="adapter file to write (best validation score)")
    trainer.add_argument("--val", action="append", default=[], metavar="DATA",
                         help="a validation source, as DATA (repeatable; default: every 5th (case, structure, slice) "
                              "sample of DATA held out); --val-per-structure of each are scored")
    trainer.add_argument("--labels", help="labels of sources without their own labels= (default: all present)")
    trainer.add_argument("--val-labels", help="labels of validation sources without labels= (default: as --labels)")
    trainer.add_argument("--split", help="datalist key of the training sources (default: training)")
    trainer.add_argument("--steps", type=int, default=300)
    trainer.add_argument("--batch-size", type=int, default=8)
    trainer.add_argument("--lr", type=float, default=1e-4)
    trainer.add_argument("--seed", type=int, default=0)
    trainer.add_argument("--eval-every", type=int, default=50)
    trainer.add_argument("--restart", action="store_true", help="ignore a saved state and start over")
    trainer.add_argument("--scales", default="1", metavar="S,S,...",
                         help="in-plane zooms of the training images: >1 widens the field of view (default: 1)")
    trainer.add_argument("--box-probability", type=float,
                         help="share of samples prompted with a box only (default 0.25)")
    trainer.add_argument("--box-click-probability", type=float,
                         help="share prompted with clicks and a box, the rest with clicks only (default 0.4)")
    trainer.add_argument("--slab-box-probability", type=float, default=0.0, metavar="P",
                         help="of the box-only samples, the share boxed around the structure on the nearby slices "
                              "too (1, 2, 4 or all): the looser boxes of 3D propagation and ROIs (default 0)")
    trainer.add_argument("--box-teacher", action=argparse.BooleanOptionalAction, default=True,
                         help="box-only samples learn the backbone's answer, not the labels (default: on)")
    trainer.add_argument("--train-encoder", action="store_true",
                         help="train the encoder adapters too (backpropagates through the encoder: use a GPU)")
    trainer.add_argument("--encoder-blocks", type=int, default=0, metavar="N",
                         help="train the adapters of the encoder's last N blocks too, on cached inputs of those "
                              "blocks (2D, or 3D on slabs of them; cheap enough for a CPU)")
    trainer.add_argument("--target-probability", type=float, default=0.0, metavar="P",
                         help="share of samples whose prompt also names the structure: the adapters learn a target "
                              "prompt per label name (msa segment --text NAME; default 0: none)")
    trainer.add_argument("--targets-only", action="store_true",
                         help="train the target prompts alone: every other tensor of --adapters stays as it is, so "
                              "prompts without a name answer exactly as before")
    trainer.add_argument("--depth-only", action="store_true",
                         help="with --three-d: train the depth adapters alone: every other tensor of --adapters "
                              "stays as it is, so the 2D answers are exactly those of that file")
    trainer.add_argument("--val-per-structure", type=int, default=24,
                         help="validation slices per source and structure, spread evenly (0: all; default 24)")
    _model_options(trainer, runtime=True)  # the runtime encodes the frozen trunks
    trainer.set_defaults(func=_cmd_train)

    pretrainer = commands.add_parser("pretrain", help="self-supervised encoder-adapter pretraining (MAE, e-Mix, ShED)")
    pretrainer.add_argument("images", nargs="+", help="unlabeled images, DICOM folders (files with or without .dcm), or folders of those")
    pretrainer.add_argument("--out", required=True, help="adapter file to write (start msa train from it)")
    pretrainer.add_argument("--objectives", default="mae,emix,shed", help="any of mae, emix, shed")
    pretrainer.add_argument("--steps", type=int, default=200)
    pretrainer.add_argument("--batch-size", type=int, default=4)
    pretrainer.add_argument("--lr", type=float, default=1e-4)
    pretrainer.add_argument("--seed", type=int, default=0)
    _model_options(pretrainer)
    pretrainer.set_defaults(func=_cmd_pretrain)

    bench = commands.add_parser("bench", help="benchmarks")
    bench.add_argument("name", choices=["latency", "runtime"],
                       help="latency: a click with and without the embedding cache; runtime: the encoder in "
                            "PyTorch vs OpenVINO (fp32, and bf16 where the CPU has it) on the sample CT")
    bench.add_argument("image", nargs="?", help="image to time (default: the sample CT)")
    bench.add_argument("--clicks", type=int, default=5, help="clicks averaged per measurement")
    bench.add_argument("--json", action="store_true")
    _model_options(bench, runtime=True)
    bench.set_defaults(func=_cmd_bench)

    params = commands.add_parser("params", help="count total and trainable parameters of a backbone with adapters, "
                                                "or (--checkpoint) say what a checkpoint file holds")
    params.add_argument("--backbone", default="lite_medsam", choices=sorted(BACKBONE_NAMES))
    params.add_argument("--checkpoint", help="describe this file instead: layout, image size, adapters, "
                                             "relative-position tables")
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
