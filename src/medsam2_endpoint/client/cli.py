"""`medsam2-endpoint predict` and `predict-2d`: argument parsing, logging, printing; the work is the library's
(`segment()`, `segment_2d()`). Exit codes: 0 success, 1 the endpoint answered an error, 2 bad inputs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medsam2_endpoint.base.log import LOGGER_NAME
from medsam2_endpoint.client.presets import PRESET_NAMES, describe_presets
from medsam2_endpoint.client.prompts import ObjectPrompt, load_objects, load_prompts
from medsam2_endpoint.client.segment import DEFAULT_ENDPOINT, DicomWebSeries, SegmentationResult, segment
from medsam2_endpoint.client.segment2d import OUTPUT_TYPES, Segmentation2DResult, segment_2d
from medsam2_endpoint.client.transport import KEY_ENV, ClientError, EndpointError

__all__ = ["predict_2d_main", "predict_main"]
# Loggers whose INFO lines (highdicom's "copy Study-related attributes ...", the library's own) are for --verbose.
LIBRARY_LOGGERS = (LOGGER_NAME, "highdicom", "pydicom")

EXAMPLES = """examples:
  medsam2-endpoint predict ct.nii.gz --bbox 120 140 210 230 --key-slice 42 --preset ct-soft-tissue
  medsam2-endpoint predict dicom_folder/ --bbox 120 140 210 230 --key-slice 10 --label liver -o liver.dcm --preview p.png
  medsam2-endpoint predict mr.nii.gz --objects objects.json --preset mri --propagation up --max-slices 20
  medsam2-endpoint predict ct.nii.gz --bbox 50 50 150 150 --key-slice 5 --endpoint https://NAME.REGION.inference.ml.azure.com/score
  medsam2-endpoint predict --dicomweb https://pacs.example/dicom-web --study 1.2.3 --series 1.2.3.4 --bbox 120 140 210 230 \\
      --key-slice 10 --preset ct-soft-tissue --store-seg

"""
EXAMPLES_2D = """examples:
  medsam2-endpoint predict-2d slice.png --bbox 40 30 120 110 -o mask.png --preview preview.png
  medsam2-endpoint predict-2d slice.png --point 80 70 --negative 5 5 --model MedSAM2_latest -o mask.geojson
  medsam2-endpoint predict-2d ct_slice.dcm --bbox 200 180 330 300 --preset ct-soft-tissue -o liver.png -o liver.geojson
"""


@contextmanager
def cli_logging(*, verbose: bool, quiet: bool) -> Iterator[None]:
    """Log lines on stderr as bare messages: the library's, highdicom's and pydicom's from WARNING (ERROR with
    --quiet, INFO with --verbose). Levels are restored afterwards (the CLI may run inside another program)."""
    level = logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved = [(lg, lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
        lg.addHandler(handler)
        lg.propagate = False  # shown once, by this handler, whatever the host program's root logger does
    try:
        yield
    finally:
        for lg, old_level, old_propagate in saved:
            lg.removeHandler(handler)
            lg.setLevel(old_level)
            lg.propagate = old_propagate


def _common(p: argparse.ArgumentParser) -> None:
    """The options both commands share."""
    win = p.add_mutually_exclusive_group()
    win.add_argument("--window", nargs=2, type=float, metavar=("LO", "HI"), help="intensity window [lower, upper]")
    win.add_argument("--preset", choices=PRESET_NAMES, help="a named window (see below)")
    p.add_argument("--model", help="model name (default: the endpoint's default)")
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help=f"scoring URL (default {DEFAULT_ENDPOINT})")
    p.add_argument("--deployment", help="Azure deployment to target (azureml-model-deployment header)")
    p.add_argument("--metadata", help="write the endpoint's metadata (JSON) here")
    p.add_argument("--retries", type=int, default=4, help="retries on 429/503 (default 4)")
    talk = p.add_mutually_exclusive_group()
    talk.add_argument("-q", "--quiet", action="store_true", help="no progress bars, only errors")
    talk.add_argument("-v", "--verbose", action="store_true", help="also the library's log lines (and highdicom's, pydicom's)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medsam2-endpoint predict", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Segment a local volume, DICOM series folder or DICOMweb series through a running endpoint.",
        epilog=EXAMPLES + f"{describe_presets()} The key is read from ${KEY_ENV}. -o NAME.dcm writes a DICOM "
        "Segmentation referencing the source series (DICOM folder input), -o NAME.nii.gz a NIfTI label map. With --dicomweb the "
        "endpoint reads the series from the DICOMweb server itself (the URL must be in its MEDSAM2_DICOMWEB_URLS) and, "
        "with --store-seg, stores the DICOM SEG into the same study; slice indices are in the server's order, by position.",
    )
    p.add_argument("volume", nargs="?", help="NIfTI/NRRD/MHA file or DICOM series folder (not with --dicomweb)")
    p.add_argument("--dicomweb", metavar="URL", help="DICOMweb base URL of a PACS the endpoint reads the series from (with --study, --series)")
    p.add_argument("--study", metavar="UID", help="StudyInstanceUID of the DICOMweb series")
    p.add_argument("--series", metavar="UID", help="SeriesInstanceUID: the DICOMweb series, or which series of a folder holding several")
    p.add_argument("--store-seg", action="store_true", help="have the endpoint store the DICOM SEG into the DICOMweb study (STOW-RS)")
    p.add_argument("--bbox", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"), help="box on the key slice (x = column)")
    p.add_argument("--key-slice", type=int, help="z index of the key slice")
    p.add_argument("--objects", help='JSON file: [{"id": 1, "bbox": [...], "key_slice": 12, "label": "liver"}, ...] (instead of --bbox/--key-slice)')
    p.add_argument("--label", help="the object's label in a DICOM SEG (with --bbox; default 'object 1')")
    p.add_argument("--prompts", help='JSON file: the request\'s objects, [{"id": 1, "prompts": [{"slice": 12, "box": [...]}, '
                   '{"slice": 15, "points": [[x, y]], "labels": [1]}]}] (boxes, points, recist per slice)')
    p.add_argument("--previous", help="an earlier answer's mask file to refine (sends volume_id first, uploads on 409)")
    p.add_argument("--modality", choices=["CT", "MR"], help="without a window, MR is windowed to its 0.5-99.5th percentiles")
    p.add_argument("--propagation", choices=["both", "up", "down"], help="walk both ways from the key slice (default), up (higher z) or down")
    p.add_argument("--stop-after-empty", type=int, metavar="N", help="stop a direction after N empty slices (server default 2; 0 = never)")
    p.add_argument("--max-slices", type=int, metavar="N", help="at most N slices per direction")
    p.add_argument("-o", "--output", action="append", help="mask file: NAME.nii.gz (NIfTI) or NAME.dcm (DICOM SEG; DICOM input); "
                   "repeat for both (default: <volume name>_mask.nii.gz)")
    p.add_argument("--preview", help="PNG of the key slice and its neighbours, and three orthogonal planes, with the mask outlined")
    p.add_argument("--panels", type=int, default=5, help="slices in the preview (default 5)")
    p.add_argument("--mask-format", choices=["nifti", "rle"], default="nifti", help="mask encoding of the answer")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer (default 600)")
    _common(p)
    return p


def _default_output(volume: str) -> Path:
    name = Path(volume.rstrip("/\\")).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return Path(f"{name}_mask.nii.gz")


def _source(args: argparse.Namespace) -> str | DicomWebSeries:
    if args.dicomweb is None:
        if args.volume is None:
            raise ClientError("give a volume file or DICOM folder, or --dicomweb URL --study UID --series UID")
        if args.study:
            raise ClientError("--study names a DICOMweb series; give it with --dicomweb")
        return str(args.volume)
    if args.volume is not None:
        raise ClientError("give a volume or --dicomweb, not both")
    if not args.study or not args.series:
        raise ClientError("--dicomweb needs --study UID and --series UID")
    return DicomWebSeries(args.dicomweb, args.study, args.series)


def _objects(args: argparse.Namespace) -> tuple[list[ObjectPrompt] | None, list[dict[str, object]] | None]:
    """(objects, prompts) from --objects, --prompts or --bbox/--key-slice/--label."""
    if args.prompts:
        if args.objects or args.bbox or args.key_slice is not None or args.label:
            raise ClientError("give --prompts, --objects or --bbox/--key-slice (and --label), not several")
        return None, load_prompts(args.prompts)
    if args.objects:
        if args.bbox or args.key_slice is not None or args.label:
            raise ClientError("give --objects or --bbox/--key-slice (and --label), not both")
        return load_objects(args.objects), None
    if args.bbox is None or args.key_slice is None:
        raise ClientError("give --bbox X0 Y0 X1 Y1 and --key-slice K, or --objects FILE")
    return [ObjectPrompt(tuple(args.bbox), args.key_slice, 1, args.label)], None


def _endpoint_error(exc: EndpointError) -> int:
    print(f"error: {exc}", file=sys.stderr)
    if exc.body is not None:  # the endpoint's own JSON error, as it came
        print(json.dumps(exc.body) if isinstance(exc.body, dict) else str(exc.body), file=sys.stderr)
    return 1


def predict_main(argv: list[str]) -> int:
    """`medsam2-endpoint predict ...`: 0 on success, 1 when the endpoint answered an error, 2 for bad inputs."""
    args = _parser().parse_args(argv)
    with cli_logging(verbose=args.verbose, quiet=args.quiet):
        return _predict(args)


def _predict(args: argparse.Namespace) -> int:
    try:
        source = _source(args)
        objects, prompts = _objects(args)
        result = segment(
            source, objects=objects, window=args.window, preset=args.preset, model=args.model,
            endpoint=args.endpoint, deployment=args.deployment, mask_format=args.mask_format,
            series_uid=None if isinstance(source, DicomWebSeries) else args.series, timeout=args.timeout, retries=args.retries,
            progress=not args.quiet and sys.stderr.isatty(), propagation=args.propagation, stop_after_empty=args.stop_after_empty,
            max_slices=args.max_slices, modality=args.modality, prompts=prompts, previous=args.previous, store_seg=args.store_seg,
        )
    except EndpointError as exc:
        return _endpoint_error(exc)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    default = _default_output(source) if isinstance(source, str) else Path(f"{source.series}_mask.nii.gz")
    outputs = []
    for target in args.output or [default]:
        try:
            outputs.append(result.save(target))
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except (RuntimeError, OSError):
            print(f"error: cannot write the mask to {target}", file=sys.stderr)
            return 2
    _report(result, outputs)
    if args.metadata:
        Path(args.metadata).write_text(json.dumps(result.metadata, indent=1))
    if args.preview:
        try:
            print(f"preview: {result.preview(args.preview, panels=args.panels)}")
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


def _report(result: SegmentationResult, outputs: list[Path]) -> None:
    for obj, meta in zip(result.objects, result.metadata, strict=True):
        model = meta.get("model", {}).get("name", "?")
        print(f"object {obj.object_id}: {meta.get('voxel_count')} voxels, {meta.get('volume_ml')} ml, model {model}, "
              f"{meta.get('timing_ms', {}).get('total', 0) / 1000:.1f} s")
        stored = meta.get("dicom_seg")  # stored into the PACS by the endpoint (--store-seg)
        if stored and "error" in stored:
            print(f"DICOM SEG not stored (the mask is written): {stored['error']}")
        elif stored:
            print(f"DICOM SEG stored: study {stored.get('study_uid')}, series {stored.get('series_uid')}, "
                  f"instance {stored.get('sop_instance_uid')}")
    for out in outputs:
        print(f"mask: {out}")


def _parser_2d() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medsam2-endpoint predict-2d", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Segment one 2D image (PNG, JPEG, TIFF or a DICOM slice) through the endpoint's 2D route.",
        epilog=EXAMPLES_2D + f"{describe_presets()} The key is read from ${KEY_ENV}.",
    )
    p.add_argument("image", help="PNG, JPEG, TIFF or DICOM slice")
    p.add_argument("--bbox", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"), help="box prompt (x = column)")
    p.add_argument("--point", nargs=2, type=float, action="append", default=[], metavar=("X", "Y"),
                   help="foreground point (repeatable; MedSAM2 models: LiteMedSAM takes boxes only)")
    p.add_argument("--negative", nargs=2, type=float, action="append", default=[], metavar=("X", "Y"), help="background point (repeatable)")
    p.add_argument("--output-type", choices=OUTPUT_TYPES, default="single", help="single (default), or among the model's 3 masks")
    p.add_argument("-o", "--output", action="append", help="NAME.png (mask 0/255) or NAME.geojson (polygons); repeatable (default: <image>_mask.png)")
    p.add_argument("--preview", help="PNG of the image with the mask outlined and the prompt drawn")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer (default 120)")
    _common(p)
    return p


def predict_2d_main(argv: list[str]) -> int:
    """`medsam2-endpoint predict-2d ...`: 0 on success, 1 when the endpoint answered an error, 2 for bad inputs."""
    args = _parser_2d().parse_args(argv)
    with cli_logging(verbose=args.verbose, quiet=args.quiet):
        try:
            result = segment_2d(args.image, bbox=args.bbox, points=args.point, negative=args.negative, window=args.window,
                                preset=args.preset, model=args.model, output_type=args.output_type, endpoint=args.endpoint,
                                deployment=args.deployment, timeout=args.timeout, retries=args.retries)
            outputs = [result.save(target) for target in args.output or [Path(args.image).with_suffix("").name + "_mask.png"]]
        except EndpointError as exc:
            return _endpoint_error(exc)
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        _report_2d(result, outputs)
        if args.metadata:
            Path(args.metadata).write_text(json.dumps(result.metadata, indent=1))
        if args.preview:
            print(f"preview: {result.preview(args.preview)}")
        return 0


def _report_2d(result: Segmentation2DResult, outputs: list[Path]) -> None:
    model = result.metadata.get("model", {}).get("name", "?")
    for i, (mask, quality) in enumerate(zip(result.masks, result.qualities, strict=True)):
        print(f"mask {i}: {int(mask.sum())} px, quality {quality:.3f}, model {model}")
    for out in outputs:
        print(f"mask: {out}")
