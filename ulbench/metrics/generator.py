"""Evaluate a generator without writing images: a user's sampler as an ``ImageSource`` (EDM2's ``calculate_metrics
gen``).

Protocol. ``ulbench eval fid --generator MODULE:FUNCTION`` imports ``FUNCTION`` and calls it once with no arguments
(under torchrun the process group is already up, so it may read ``LOCAL_RANK`` or ``torch.cuda.current_device()``);
it returns ``sample(seeds, labels)``:

- ``seeds``: LongTensor (B,), the samples' seeds; the image of a seed must depend on that seed (and its label) only,
  never on which other seeds share the batch (seed each sample's noise, e.g. one ``torch.Generator`` per seed);
- ``labels``: LongTensor (B,) of class indices, or None for an unconditional generator (no ``--num-classes``);
- returns a uint8 tensor (B, 3, H, W) (or (B, 1, H, W): gray, expanded to RGB), on any device.

Seeds are 0 .. N-1 (``--num-samples N``) or ``--seeds`` (``0-49999``, ``0,5,9-12``); with ``--num-classes K`` the
label of seed s is ``s mod K`` (balanced over any K consecutive seeds). Seeds go to ``sample`` in batches of
``--batch-size`` in order, and under torchrun each rank takes its contiguous share of those batches
(``ulbench.dist.shard``), so every image, and so every feature, is the same under any batch size and world size.

Where the module is looked for: ``MODULE`` is a dotted module name imported with the current directory first on
``sys.path`` (as ``python -m`` does), or a path to a ``.py`` file (``path/to/sampler.py:make_sampler``), loaded from
that file.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ulbench.errors import UserError
from ulbench.metrics.images import ImageSource, check_limit

SPEC_FORM = "MODULE:FUNCTION (a dotted module importable from the current directory, or path/to/file.py:FUNCTION)"


def parse_seeds(text: str) -> list[int]:
    """``"0-9,20,30-31"`` -> [0, ..., 9, 20, 30, 31] (ranges inclusive, as EDM2's ``--seeds``)."""
    seeds = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise UserError(f"--seeds '{text}': '{part}' is not a seed or an increasing range; write e.g. 0-49999 or "
                            "0,5,9-12 (non-negative integers, ranges inclusive)")
        lo = int(m.group(1))
        seeds.extend(range(lo, int(m.group(2) or lo) + 1))
    return seeds


def _import_module(module: str, spec: str):
    if module.endswith(".py"):
        path = Path(module).expanduser()
        if not path.is_file():
            raise UserError(f"--generator {spec}: no such file {path}. Give {SPEC_FORM}.")
        loader_spec = importlib.util.spec_from_file_location(f"ulbench_generator_{path.stem}", path)
        mod = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(mod)
        return mod
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # the current directory first, as `python -m` has it
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
            raise  # a module that the user's module imports is missing: its own traceback says which
        raise UserError(f"--generator {spec}: no module named '{e.name}' (looked in the current directory "
                        f"{os.getcwd()} and on sys.path). Give {SPEC_FORM}.") from None


def split_spec(spec: str) -> tuple[str, str]:
    """``MODULE:FUNCTION`` -> (MODULE, FUNCTION), or a UserError showing the form."""
    module, sep, attr = str(spec).rpartition(":")
    if not sep or not module or not attr.isidentifier():
        raise UserError(f"--generator '{spec}': expected {SPEC_FORM}, e.g. mypkg.sampling:make_sampler")
    return module, attr


def load_sampler(spec: str) -> Callable:
    """Import ``MODULE:FUNCTION``, call ``FUNCTION()`` and return the ``sample(seeds, labels)`` it makes."""
    module, attr = split_spec(spec)
    mod = _import_module(module, spec)
    make = getattr(mod, attr, None)
    if make is None:
        found = sorted(n for n, v in vars(mod).items() if callable(v) and not n.startswith("_"))[:10]
        raise UserError(f"--generator {spec}: module '{module}' has no attribute '{attr}' (its callables: "
                        f"{', '.join(found) or 'none'})")
    if not callable(make):
        raise UserError(f"--generator {spec}: '{attr}' is a {type(make).__name__}, not a function returning "
                        "sample(seeds, labels)")
    sample = make()
    if not callable(sample):
        raise UserError(f"--generator {spec}: {attr}() returned a {type(sample).__name__}; it must return a callable "
                        "sample(seeds: LongTensor[B], labels: LongTensor[B] | None) -> uint8 (B, 3, H, W)")
    return sample


def labels_of(seeds: torch.Tensor, num_classes: int | None) -> torch.Tensor | None:
    """The class label of each seed: ``seed mod num_classes`` (None: unconditional)."""
    return None if num_classes is None else seeds % num_classes


def _checked(images: object, seeds: torch.Tensor, name: str) -> list[np.ndarray]:
    """A sampler's output -> list of (H, W, 3) uint8, or a UserError naming what is wrong and the fix."""
    if not isinstance(images, torch.Tensor):
        raise UserError(f"{name}: sample() returned a {type(images).__name__}; it must return a torch.Tensor uint8 "
                        "(B, 3, H, W)")
    shape = tuple(images.shape)
    if images.dtype != torch.uint8:
        raise UserError(f"{name}: sample() returned {images.dtype} {shape}; it must return uint8 (B, 3, H, W) in "
                        "0..255. Quantize float images like a saved PNG: "
                        "ulbench.metrics.images.quantize_images(x, value_range=(-1, 1))")
    if images.ndim != 4 or images.shape[0] != len(seeds) or images.shape[1] not in (1, 3) or 0 in shape[2:]:
        raise UserError(f"{name}: sample() returned shape {shape} for {len(seeds)} seeds; it must return "
                        f"({len(seeds)}, 3, H, W) (one image per seed, channels first)")
    return list(images.detach().expand(-1, 3, -1, -1).permute(0, 2, 3, 1).cpu().numpy())


def generator_source(sample: Callable | str, num_samples: int | None = None, seeds: Sequence[int] | None = None,
                     num_classes: int | None = None, name: str | None = None, limit: int | None = None) -> ImageSource:
    """Images ``sample(seeds, labels)`` for seeds 0 .. num_samples-1 (or ``seeds``), made batch by batch as the
    evaluator reads them: ``ImageEvaluator().fid(generator_source(sample, 50000), "ref.npz")``. ``sample`` may be a
    callable or a ``MODULE:FUNCTION`` spec (``load_sampler``). Never cached (a generator has no stable identity).
    Making the source samples the first seed once, so a wrong output fails before any Inception work and the
    resolution is known for the fingerprint."""
    if isinstance(sample, str):
        split_spec(sample)  # the form first; the module is imported once the counts are checked
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise UserError(f"--num-classes {num_classes}: must be an integer >= 1 (omit it for an unconditional "
                        "generator)")
    if seeds is None:
        if num_samples is None or isinstance(num_samples, bool) or not isinstance(num_samples, int) \
                or num_samples < 1:
            raise UserError(f"--num-samples {num_samples}: give the number of samples (>= 1) or --seeds")
        seeds = range(num_samples)
    elif num_samples is not None and num_samples != len(seeds):
        raise UserError(f"--num-samples {num_samples} and --seeds ({len(seeds)} seeds) disagree; give one of them")
    check_limit(limit)
    all_seeds = torch.as_tensor(list(seeds), dtype=torch.long)[:limit]
    if len(all_seeds) == 0:
        raise UserError("--seeds: no seeds given")
    if isinstance(sample, str):
        from ulbench import dist

        dist.rank_world()  # under torchrun: the process group up and this rank's GPU current before make_sampler()
        name = name or f"generator {sample}"
        sample = load_sampler(sample)
    name = name or f"generator {getattr(sample, '__qualname__', type(sample).__name__)}"

    def batches(batch_size: int, start: int, stop: int) -> Iterator[list[np.ndarray]]:
        for i in range(start, stop, batch_size):
            s = all_seeds[i: min(i + batch_size, stop)]
            yield _checked(sample(s, labels_of(s, num_classes)), s, name)

    first = _checked(sample(all_seeds[:1], labels_of(all_seeds[:1], num_classes)), all_seeds[:1], name)[0]
    return ImageSource(name, len(all_seeds), batches, resolution=first.shape[:2])
