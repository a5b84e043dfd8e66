"""Detect and align the faces of a folder of photos with MTCNN, mirroring the folder tree.

    python datasets/align_dataset.py --input_dir RAW --output_dir ALIGNED
    python datasets/align_dataset.py --input_dir RAW --output_dir ALIGNED --image_size 182 --margin 44
    python datasets/align_dataset.py --input_dir RAW --output_dir ALIGNED112 --template arcface112

This replaces the TensorFlow 1 script (davidsandberg/facenet `src/align/align_dataset_mtcnn.py`) that the
original repository told users to run before training. Two output styles:

- `--template none` (default): the seed's crop. A square around the detected face box plus `--margin`, cropped
  from the original photo and resized to `--image_size`. The margin is in pixels of the output (a 160 px
  output with margin 32 shows the face box on its central 128 px), as facenet-pytorch does; Sandberg's script
  added the margin in pixels of the raw photo, so its crops depended on the photo's resolution. The usual
  settings are `--image_size 182 --margin 44` for VGGFace2 and `--image_size 160 --margin 32` for LFW.
- `--template arcface112`: a similarity warp of the five MTCNN landmarks onto the standard 112x112 ArcFace
  template (InsightFace's `norm_crop`), the alignment of `../shared/data/lfw_112`.

The detector is the MTCNN of Zhang et al. 2016 with the network weights that the facenet-pytorch wheel
carries (https://github.com/timesler/facenet-pytorch, nothing downloads): `datasets/mtcnn.py` runs the
cascade, `datasets/face_alignment.py` turns a face into a crop, and this file is the command around them
(finding the photos, worker processes, the report, resuming).

Large photos are shrunk to `--max_side` for detection only; boxes and landmarks are mapped back and the crop
is taken from the full-resolution photo. Photos where no face passes `--min_face_prob`, and files that cannot
be decoded, are listed in `alignment_report.json` in the output folder with per-identity counts. A second run
skips photos whose output exists and photos the report already lists (use `--retry_failed` to try those
again; a run with other detection settings, `--min_face_prob`, `--min_face_size` or `--max_side`, tries
them again by itself). An output folder holds the crops of one input folder and one set of crop settings.

The same command gives the same files. Photos of one size go through the detector's networks together, so
another `--batch_size` or `--num_workers` can move a crop's pixels by one grey level (floating-point sums in
another order), and MTCNN's landmarks carry facenet-pytorch's own bias of about one detector pixel, which
the shrink to `--max_side` scales up in the photo; both are the same for training and inference crops.
"""

import argparse
import json
import multiprocessing
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from datasets.face_alignment import TEMPLATES, align_face
from datasets.image_files import to_rgb
from datasets.mtcnn import FaceDetector, detection_view, select_face, to_photo_coordinates
from devices import available_cpus, resolve_device
from errors import InputError, report_input_errors
from fileio import atomic_write, write_json_atomic

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
OUTPUT_FORMATS = {"png": ("PNG", ".png"), "jpg": ("JPEG", ".jpg")}
REPORT_NAME = "alignment_report.json"
MAX_CROP_SIDE = 4096
# settings that decide what an output file looks like; a resumed run must use the same ones
OUTPUT_SETTINGS = ("template", "image_size", "margin", "format")
# settings that decide whether a face is found; a resumed run that changes them tries the failures again
DETECTION_SETTINGS = ("min_face_prob", "min_face_size", "max_side")


# --------------------------------------------------------------------------------------------- photos


@dataclass(frozen=True)
class AlignConfig:
    """Everything a worker needs to turn a photo into an aligned crop."""

    input_dir: str
    output_dir: str
    template: str = "none"
    image_size: int = 160
    margin: int = 32
    format: str = "png"
    min_face_prob: float = 0.9
    min_face_size: int = 20
    max_side: int = 640
    device: str = "cpu"


def load_photo(path):
    """The photo at `path` as an upright RGB PIL image (EXIF orientation applied)."""
    with Image.open(path) as image:
        return to_rgb(ImageOps.exif_transpose(image))


def output_path(relative_path, config):
    return Path(config.output_dir) / Path(relative_path).with_suffix(OUTPUT_FORMATS[config.format][1])


def save_crop(image, path, image_format):
    """Write atomically, so an interrupted run never leaves a half-written crop to be skipped."""
    # zlib level 1: a 160 px PNG in 3 ms instead of 9 ms, for files about 10% larger
    options = {"quality": 95} if image_format == "JPEG" else {"compress_level": 1}
    with atomic_write(path, "wb") as handle:
        image.save(handle, format=image_format, **options)


class Aligner:
    """Loads, detects, aligns and saves batches of photos; one per worker process."""

    def __init__(self, config):
        self.config = config
        self.detector = FaceDetector(device=config.device, min_face_size=config.min_face_size)

    def align_batch(self, relative_paths):
        """Align the photos and return (relative_path, status, detail) for each; status is one of
        "aligned", "no_face" or "unreadable"."""
        photos, views, shrinks, results = [], [], [], {}
        for relative_path in relative_paths:
            try:
                photo = load_photo(Path(self.config.input_dir) / relative_path)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                results[relative_path] = ("unreadable", f"{type(error).__name__}: {error}")
                continue
            view, shrink = detection_view(photo, self.config.max_side)
            photos.append((relative_path, photo))
            views.append(view)
            shrinks.append(shrink)
        detections = self.detector.detect(views)
        for (relative_path, photo), view, faces, shrink in zip(
            photos, views, detections, shrinks, strict=True
        ):
            view_face = select_face(faces, view.shape[1], view.shape[0], self.config.min_face_prob)
            if view_face is None:
                results[relative_path] = ("no_face", "")
                continue
            face = to_photo_coordinates(view_face, shrink)
            config = self.config
            crop = align_face(photo, face, config.template, config.image_size, config.margin)
            save_crop(crop, output_path(relative_path, self.config), OUTPUT_FORMATS[self.config.format][0])
            results[relative_path] = ("aligned", f"{face.prob:.3f}")
        return [(relative_path, *results[relative_path]) for relative_path in relative_paths]


_worker_aligner = None
_worker_error: Exception | None = None


def _init_worker(config, num_threads):
    global _worker_aligner, _worker_error
    torch.set_num_threads(num_threads)
    try:
        _worker_aligner = Aligner(config)
    # raised here, the pool would start a new worker forever: the worker's first batch raises it instead
    except Exception as error:
        _worker_error = error


def _align_in_worker(relative_paths):
    if _worker_error is not None:
        raise _worker_error
    return _worker_aligner.align_batch(relative_paths)


# --------------------------------------------------------------------------------------------- dataset


def list_photos(input_dir):
    """Relative POSIX paths of the image files under input_dir (any depth), sorted; hidden files skipped."""
    input_dir = Path(input_dir)
    photos = []
    for path in input_dir.rglob("*"):
        relative = path.relative_to(input_dir)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            photos.append(relative.as_posix())
    return sorted(photos)


def identity_of(relative_path):
    """The identity folder of a photo: its first path component ("." for photos at the top level)."""
    parts = Path(relative_path).parts
    return parts[0] if len(parts) > 1 else "."


def check_folders(input_dir, output_dir):
    input_dir, output_dir = Path(input_dir).resolve(), Path(output_dir).resolve()
    if not input_dir.is_dir():
        raise InputError(f"--input_dir {input_dir} is not a folder")
    if output_dir == input_dir or input_dir in output_dir.parents:
        raise InputError(
            f"--output_dir {output_dir} is inside --input_dir {input_dir}; choose a folder outside it"
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output_dir {output_dir} exists and is not a folder")


def read_previous_report(config):
    """The report of an earlier run into the same output folder, or None; refuses different settings."""
    path = Path(config.output_dir) / REPORT_NAME
    if not path.exists():
        output_dir = path.parent
        if output_dir.is_dir() and any(output_dir.iterdir()):
            # crops of unknown settings (another tool's, or of a run killed before its report existed):
            # adding ours would mix two crop rules in one dataset
            raise InputError(
                f"--output_dir {output_dir} holds files but no {REPORT_NAME}, so not crops this tool can add "
                "to; use an empty or new folder"
            )
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        previous_settings = report["settings"]
        if not (
            isinstance(previous_settings, dict)
            and isinstance(report.get("input_dir"), str)
            and isinstance(report.get("no_face", []), list)
            and all(isinstance(item, str) for item in report.get("no_face", []))
            and isinstance(report.get("unreadable", {}), dict)
        ):
            raise TypeError("unexpected structure")
    except (ValueError, KeyError, TypeError) as error:  # ValueError: bad JSON or bad UTF-8
        raise InputError(f"{path} is not an alignment report ({error}); delete it to start over") from None
    if Path(report["input_dir"]).resolve() != Path(config.input_dir).resolve():
        raise InputError(
            f"{config.output_dir} holds crops of {report['input_dir']}, not of {config.input_dir}; "
            "use another --output_dir"
        )
    for name in OUTPUT_SETTINGS:
        if previous_settings.get(name) != getattr(config, name):
            raise InputError(
                f"{config.output_dir} holds crops made with {name}={previous_settings.get(name)!r}, not "
                f"{getattr(config, name)!r}; use another --output_dir"
            )
    return report


def detection_changed(previous_report, config) -> bool:
    """Whether this run detects faces with other settings than the run that wrote `previous_report`."""
    return any(previous_report["settings"].get(name) != getattr(config, name) for name in DETECTION_SETTINGS)


def plan_work(relative_paths, config, previous_report, retry_failed):
    """Split the photos into those to align now and the outcome already known for the others."""
    known = {}
    if previous_report is not None and not retry_failed:
        for relative_path in previous_report.get("no_face", []):
            known[relative_path] = ("no_face", "")
        for relative_path, detail in previous_report.get("unreadable", {}).items():
            known[relative_path] = ("unreadable", detail)
    todo, outcomes, sources = [], {}, {}
    for relative_path in relative_paths:
        target = output_path(relative_path, config)
        if target in sources:  # e.g. a.jpg and a.png in one folder would both become a.png
            raise InputError(
                f"{sources[target]} and {relative_path} would both be written to {target}; rename one"
            )
        sources[target] = relative_path
        if target.exists():
            outcomes[relative_path] = ("aligned", "")
        elif relative_path in known:
            outcomes[relative_path] = known[relative_path]
        else:
            todo.append(relative_path)
    return todo, outcomes


def run_alignment(todo, config, num_workers, batch_size, progress=True):
    """Yield (relative_path, status, detail) for every photo of `todo`, with a progress bar.

    With num_workers > 0 each worker process owns a detector and handles whole batches (decode, detect,
    crop, save), so nothing bigger than a file name crosses process boundaries.
    """
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
    bar = tqdm(total=len(todo), unit="img", desc="aligning", disable=not progress, smoothing=0.05)
    no_face = 0
    try:
        for batch_results in _map_batches(batches, config, num_workers):
            no_face += sum(status != "aligned" for _, status, _ in batch_results)
            bar.update(len(batch_results))
            bar.set_postfix(failed=no_face, refresh=False)
            yield from batch_results
    finally:
        bar.close()


def _map_batches(batches, config, num_workers):
    if num_workers == 0:
        aligner = Aligner(config)
        yield from map(aligner.align_batch, batches)
        return
    # one thread per worker: MTCNN's small convolutions gain little from more, and when the cores are busy
    # (other jobs, or workers > cores) waiting OpenMP threads spin: on a shared 2-core machine one worker
    # with 2 threads used 7x the CPU time per photo of two workers with one thread each
    threads_per_worker = 1
    # fork starts a CPU worker in milliseconds; CUDA cannot be used in a forked child, so GPUs spawn
    method = (
        "fork" if config.device == "cpu" and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    )
    context = multiprocessing.get_context(method)
    with context.Pool(num_workers, initializer=_init_worker, initargs=(config, threads_per_worker)) as pool:
        yield from pool.imap_unordered(_align_in_worker, batches)


def build_report(config, relative_paths, outcomes, processed):
    """The JSON-ready report: settings, totals, per-identity counts and the photos without a crop."""
    identities = {}
    for relative_path in relative_paths:
        counts = identities.setdefault(
            identity_of(relative_path), {"photos": 0, "aligned": 0, "no_face": 0, "unreadable": 0}
        )
        counts["photos"] += 1
        if relative_path in outcomes:
            counts[outcomes[relative_path][0]] += 1
    totals = {
        key: sum(counts[key] for counts in identities.values())
        for key in ("photos", "aligned", "no_face", "unreadable")
    }
    totals["processed_this_run"] = processed
    totals["not_processed"] = totals["photos"] - len(outcomes)
    return {
        "input_dir": str(Path(config.input_dir).resolve()),  # a resumed run must align the same folder
        "output_dir": str(config.output_dir),
        "settings": {
            name: value
            for name, value in asdict(config).items()
            if name not in ("input_dir", "output_dir", "device")
        },
        "totals": totals,
        "identities_without_crops": sorted(
            name for name, counts in identities.items() if counts["aligned"] == 0
        ),
        "no_face": sorted(path for path, (status, _) in outcomes.items() if status == "no_face"),
        "unreadable": {
            path: detail for path, (status, detail) in sorted(outcomes.items()) if status == "unreadable"
        },
        "identities": identities,
    }


def write_report(report, output_dir):
    path = Path(output_dir) / REPORT_NAME
    write_json_atomic(report, path, indent=1)
    return path


def align_dataset(config, num_workers=1, batch_size=16, retry_failed=False, progress=True):
    """Align every photo under config.input_dir into config.output_dir; returns the report (also written).

    The report is written even when the run is interrupted, so a rerun resumes where this one stopped.
    """
    check_folders(config.input_dir, config.output_dir)
    relative_paths = list_photos(config.input_dir)
    if not relative_paths:
        raise InputError(
            f"--input_dir {config.input_dir} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    previous_report = read_previous_report(config)
    if previous_report is not None and detection_changed(previous_report, config):
        retry_failed = True  # its failures were decided with other detection settings
    todo, outcomes = plan_work(relative_paths, config, previous_report, retry_failed)
    processed = 0
    # the settings are on disk before the first crop: even a run killed outright (SIGKILL, out of memory),
    # whose final report below never comes, leaves a folder the next run can check and resume
    write_report(build_report(config, relative_paths, outcomes, processed), config.output_dir)
    try:
        for relative_path, status, detail in run_alignment(todo, config, num_workers, batch_size, progress):
            outcomes[relative_path] = (status, detail)
            processed += 1
    finally:
        report = build_report(config, relative_paths, outcomes, processed)
        write_report(report, config.output_dir)
    return report


# --------------------------------------------------------------------------------------------- command line


def config_from_args(args):
    """Check the flags and fill in the template-dependent defaults."""
    if args.template == "arcface112" and args.margin is not None:
        raise InputError("--margin applies to --template none only (the ArcFace template fixes the framing)")
    image_size = (
        args.image_size if args.image_size is not None else (112 if args.template == "arcface112" else 160)
    )
    margin = 0 if args.template == "arcface112" else (args.margin if args.margin is not None else 32)
    if not 1 <= image_size <= MAX_CROP_SIDE:  # a typo like 100000 would need tens of GB per crop
        raise InputError(f"--image_size must be from 1 to {MAX_CROP_SIDE}, got {image_size}")
    if not 0 <= margin < image_size:
        raise InputError(
            f"--margin must be in [0, --image_size), got {margin} with --image_size {image_size}"
        )
    if not 0.0 <= args.min_face_prob <= 1.0:
        raise InputError(f"--min_face_prob must be in [0, 1], got {args.min_face_prob}")
    if args.min_face_size < 1 or args.max_side < 12:
        raise InputError(
            f"--min_face_size must be >= 1 and --max_side >= 12, got {args.min_face_size} and {args.max_side}"
        )
    if args.batch_size < 1 or (args.num_workers is not None and args.num_workers < 0):
        raise InputError(
            f"--batch_size must be >= 1 and --num_workers >= 0, got {args.batch_size} and {args.num_workers}"
        )
    return AlignConfig(
        input_dir=str(args.input_dir),
        output_dir=str(args.output_dir),
        template=args.template,
        image_size=image_size,
        margin=margin,
        format=args.format,
        min_face_prob=args.min_face_prob,
        min_face_size=args.min_face_size,
        max_side=args.max_side,
        device=str(resolve_device(args.device)),
    )


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Detect faces with MTCNN and write aligned crops, mirroring the input folder tree."
    )
    parser.add_argument("--input_dir", type=Path, required=True, help="photos, one folder per identity")
    parser.add_argument("--output_dir", type=Path, required=True, help="aligned crops and " + REPORT_NAME)
    parser.add_argument(
        "--template",
        choices=TEMPLATES,
        default="none",
        help="none: square crop around the face box plus margin; arcface112: 5-landmark similarity warp "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="output side in pixels (default: 160, 112 with arcface112)",
    )
    parser.add_argument(
        "--margin",
        type=int,
        default=None,
        help="output pixels around the face box, --template none only (default: 32)",
    )
    parser.add_argument(
        "--format",
        choices=sorted(OUTPUT_FORMATS),
        default="png",
        help="output image format (default: %(default)s)",
    )
    parser.add_argument(
        "--min_face_prob",
        type=float,
        default=0.9,
        help="faces below this MTCNN probability are ignored (default: %(default)s)",
    )
    parser.add_argument(
        "--min_face_size",
        type=int,
        default=20,
        help="smallest face searched for, in pixels of the detection view (default: %(default)s)",
    )
    parser.add_argument(
        "--max_side",
        type=int,
        default=640,
        help="photos are shrunk to this longest side for detection only (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda or cuda:N; auto: cuda when available (default: auto)",
    )
    parser.add_argument(
        "--num_workers",
        type=int,
        default=None,
        help="worker processes, each with its own detector; 0: align in this process "
        "(default: one per CPU core, at most 8)",
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=16,
        help="photos per detector call; photos of the same size share the networks' calls (default: %(default)s)",
    )
    parser.add_argument(
        "--retry_failed", action="store_true", help="try again the photos the report lists as failed"
    )
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar"
    )
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)

    def body() -> int:
        config = config_from_args(args)
        num_workers = args.num_workers if args.num_workers is not None else min(available_cpus(), 8)
        try:
            report = align_dataset(config, num_workers, args.batch_size, args.retry_failed, args.progress)
        except KeyboardInterrupt:
            print("interrupted; the report is written, run the same command again to resume", file=sys.stderr)
            return 130
        totals = report["totals"]
        print(
            f"{totals['aligned']} of {totals['photos']} photos aligned ({totals['processed_this_run']} processed "
            f"now); no face in {totals['no_face']}, unreadable {totals['unreadable']}; "
            f"see {Path(config.output_dir) / REPORT_NAME}"
        )
        return 0

    return report_input_errors(body)


if __name__ == "__main__":
    sys.exit(main())
