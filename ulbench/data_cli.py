"""`ulbench data prepare` (over ``ulbench.data.prepared.prepare``, EDM2's dataset_tool convert) and
`ulbench data photo-tree` (a small real ImageFolder tree of the bundled photos, to try the path without ImageNet)."""
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


def cmd_data_photo_tree(args: argparse.Namespace) -> None:
    from ulbench.data.builtin import write_photo_tree
    from ulbench.errors import UserError

    if args.n < 1 or args.min_side < 8 or args.max_side < args.min_side or args.classes < 1:
        raise UserError(f"data photo-tree: need --n >= 1, 8 <= --min-side <= --max-side, --classes >= 1 (got --n "
                        f"{args.n}, --min-side {args.min_side}, --max-side {args.max_side}, --classes {args.classes})")
    out = write_photo_tree(args.out, args.n, args.min_side, args.max_side, classes=args.classes, seed=args.seed)
    print(f"wrote {args.n} JPEG photo crops in {args.classes} class folders to {out}")


def register(sub):
    """Add `ulbench data prepare` to the top-level subparsers; -> the `data` subparsers (for more data verbs)."""
    dsub = sub.add_parser("data", help="datasets: prepare, photo-tree").add_subparsers(dest="action", required=True)
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
