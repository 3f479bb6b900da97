"""MVTec 3D-AD reader: discovery, pairing by stem, few-shot subsets, check and summary.

On-disk layout (MVTec 3D-AD, Bergmann et al., VISAPP 2022; docs/data.md)::

    <root>/<category>/{train,validation}/good/{rgb,xyz}/NNN.{png,tiff}
    <root>/<category>/test/<good|defect_type>/{rgb,xyz,gt}/NNN.{png,tiff,png}
    <root>/<category>/calibration/camera_parameters.json        (optional)

Rules the reader applies:

- A category is any non-hidden folder of the root. ``train`` and ``test`` are
  required, ``validation`` is optional. ``train`` and ``validation`` hold only ``good``.
- Files are paired by stem (``000.png`` <-> ``000.tiff``) inside one
  ``<split>/<defect_type>`` folder; ``rgb`` is the anchor of a sample.
- A category "has xyz" when any of its folders has an ``xyz`` sub-folder; then every
  rgb image needs its xyz partner. A category without any ``xyz`` folder is RGB-only:
  ``Sample.xyz`` is ``None``.
- A defective test image needs a gt mask; a good image without one gets an all-False
  mask. Masks are class-coded: anything > 0 is anomalous. A good image's mask must be
  all 0, a defective image's mask must mark at least one pixel.
- Every file must be readable, of the right dtype and channel count, and the same
  size as its rgb partner; xyz must be finite and in metres (see ``io.read_xyz``).

Cheap structure (``index``) never reads pixels; ``SampleRef.load`` reads and checks
one sample; ``check_dataset`` collects every problem of a dataset instead of stopping
at the first.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_runtime.data import io
from edge_runtime.data.sample import Sample
from edge_runtime.errors import DataError

SPLITS = ("train", "validation", "test")
REQUIRED_SPLITS = ("train", "test")
GOOD = "good"
# file kind -> accepted suffixes (lower case); the first is the one the layout names.
KIND_SUFFIXES = {"rgb": (".png",), "xyz": (".tiff", ".tif"), "gt": (".png",)}
CALIBRATION_FILE = Path("calibration") / "camera_parameters.json"
SHOT_MODES = ("first", "random")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: the file (or folder) and what is wrong with it."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"

    def error(self) -> DataError:
        """The same problem as a raisable ``DataError``."""
        return DataError(self.path, self.problem)


@dataclass(frozen=True)
class SampleRef:
    """Where one sample lives on disk; cheap to build, ``load()`` reads the pixels.

    paths: file paths by kind ("rgb", "xyz", "gt"); absent kinds are omitted
    (no "xyz" in an RGB-only category, no "gt" for a good image without a mask).
    """

    category: str
    split: str
    defect_type: str
    stem: str
    paths: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> int:
        """0 for a good part, 1 for a defective one (from the folder name)."""
        return 0 if self.defect_type == GOOD else 1

    @property
    def key(self) -> str:
        """"<category>/<split>/<defect_type>/<stem>", the same key as ``Sample.key``."""
        return f"{self.category}/{self.split}/{self.defect_type}/{self.stem}"

    def load(self) -> Sample:
        """Read and check the sample's files; raises ``DataError`` for the first problem."""
        sample, problems = _read_sample(self)
        if problems:
            raise problems[0].error()
        return sample


def _read_sample(ref: SampleRef) -> tuple[Sample | None, list[Problem]]:
    """Read every file of ``ref``, collecting each file's problems instead of stopping.

    Returns the Sample (``None`` if any problem was found) and the problems.
    """
    problems: list[Problem] = []

    def attempt(reader, kind):
        try:
            return reader(ref.paths[kind])
        except DataError as err:
            problems.append(Problem(err.path, err.problem))
            return None

    rgb = attempt(io.read_rgb, "rgb")
    xyz = attempt(io.read_xyz, "xyz") if "xyz" in ref.paths else None
    gt = attempt(io.read_gt, "gt") if "gt" in ref.paths else None
    if rgb is not None:
        h, w = rgb.shape[:2]
        for kind, arr in (("xyz", xyz), ("gt", gt)):
            if arr is not None and arr.shape[:2] != (h, w):
                problems.append(Problem(
                    ref.paths[kind],
                    f"{kind} is {arr.shape[0]}x{arr.shape[1]} (HxW) but its rgb partner "
                    f"{ref.paths['rgb']} is {h}x{w}",
                ))
    if gt is not None:
        n_marked = int(np.count_nonzero(gt))
        if ref.label == 0 and n_marked:
            problems.append(Problem(
                ref.paths["gt"], f"mask of a good image marks {n_marked} pixels as anomalous"))
        if ref.label == 1 and not n_marked:
            problems.append(Problem(
                ref.paths["gt"], "mask of a defective image is empty (all pixels 0)"))
    if problems:
        return None, problems
    if gt is None:
        gt = np.zeros(rgb.shape[:2], dtype=bool)
    sample = Sample(
        rgb=rgb, xyz=xyz, gt=gt, label=ref.label, defect_type=ref.defect_type,
        category=ref.category, split=ref.split, stem=ref.stem, paths=dict(ref.paths),
    )
    return sample, []


def _visible(path: Path) -> bool:
    """False for hidden entries (".DS_Store", "._000.png", ".ipynb_checkpoints")."""
    return not path.name.startswith(".")


def _list_kind(folder: Path, kind: str, problems: list[Problem]) -> dict[str, Path]:
    """stem -> file for one ``rgb`` / ``xyz`` / ``gt`` folder; stray entries are problems."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    suffixes = KIND_SUFFIXES[kind]
    for entry in sorted(filter(_visible, folder.iterdir())):
        if entry.is_dir():
            problems.append(Problem(str(entry), f"unexpected folder inside {kind}/"))
        elif entry.suffix.lower() not in suffixes:
            problems.append(Problem(
                str(entry), f"unexpected file in {kind}/ (expected {' or '.join(suffixes)})"))
        elif entry.stem in found:
            problems.append(Problem(
                str(entry), f"two {kind} files with stem {entry.stem!r} "
                f"(also {found[entry.stem].name})"))
        else:
            found[entry.stem] = entry
    return found


def _scan_folder(folder: Path, category: str, split: str, defect_type: str,
                 has_xyz: bool) -> tuple[list[SampleRef], list[Problem]]:
    """Pair the files of one ``<split>/<defect_type>`` folder by stem (no pixel reads)."""
    problems: list[Problem] = []
    files = {kind: _list_kind(folder / kind, kind, problems) for kind in KIND_SUFFIXES}
    rgb, xyz, gt = files["rgb"], files["xyz"], files["gt"]
    if not (rgb or xyz or gt):
        problems.append(Problem(str(folder), "no images (expected an rgb/ folder of .png files)"))
    refs: list[SampleRef] = []
    for stem, rgb_path in rgb.items():
        paths = {"rgb": str(rgb_path)}
        complete = True
        if has_xyz:
            if stem in xyz:
                paths["xyz"] = str(xyz[stem])
            else:
                complete = False
                problems.append(Problem(
                    str(rgb_path), f"missing xyz partner {folder / 'xyz' / (stem + '.tiff')} "
                    "(this category has xyz data)"))
        if stem in gt:
            paths["gt"] = str(gt[stem])
        elif defect_type != GOOD:
            complete = False
            problems.append(Problem(
                str(rgb_path),
                f"defective image without gt mask (expected {folder / 'gt' / (stem + '.png')})"))
        if complete:
            refs.append(SampleRef(category, split, defect_type, stem, paths))
    for kind, table in (("xyz", xyz), ("gt", gt)):
        for stem in sorted(table.keys() - rgb.keys()):
            problems.append(Problem(
                str(table[stem]),
                f"{kind} file without rgb partner (expected {folder / 'rgb' / (stem + '.png')})"))
    return refs, problems


@dataclass
class _CategoryScan:
    """Structure of one category: samples and structural problems, keyed by split.

    ``problems[None]`` holds the category-wide ones (empty category, missing split).
    """

    has_xyz: bool
    refs: dict[str, list[SampleRef]]
    problems: dict[str | None, list[Problem]]

    def all_problems(self) -> list[Problem]:
        return [p for plist in self.problems.values() for p in plist]


class MVTec3D:
    """A dataset in the MVTec 3D-AD layout rooted at ``root`` (see the module doc)."""

    def __init__(self, root: str | Path):
        root = Path(root)
        if not root.exists():
            raise DataError(root, "dataset root does not exist")
        if not root.is_dir():
            raise DataError(root, "dataset root is not a directory")
        if any((root / split).is_dir() for split in SPLITS):
            raise DataError(root, "this is a category folder (it holds train/test); "
                                  "pass the folder above it as the dataset root")
        self.root = root

    def categories(self) -> list[str]:
        """Names of the category folders, sorted."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _visible(p))

    def _category_dir(self, category: str) -> Path:
        path = self.root / category
        if not path.is_dir():
            found = ", ".join(self.categories())
            raise DataError(path, f"category does not exist (found: {found})")
        return path

    def splits(self, category: str) -> list[str]:
        """The splits present for ``category``, in the order train, validation, test."""
        cat_dir = self._category_dir(category)
        return [s for s in SPLITS if (cat_dir / s).is_dir()]

    def has_xyz(self, category: str) -> bool:
        """True if any folder of ``category`` holds an ``xyz`` sub-folder (else RGB-only)."""
        cat_dir = self._category_dir(category)
        return any((d / "xyz").is_dir() for s in SPLITS for d in (cat_dir / s).glob("*"))

    def _scan(self, category: str) -> _CategoryScan:
        """Discover every sample of ``category`` and every structural problem (no pixel reads)."""
        cat_dir = self._category_dir(category)
        has_xyz = self.has_xyz(category)
        present = self.splits(category)
        scan = _CategoryScan(has_xyz, {}, {None: []})
        if not present:
            scan.problems[None].append(Problem(
                str(cat_dir), f"empty category: no {'/'.join(SPLITS)} folder"))
            return scan
        for split in REQUIRED_SPLITS:
            if split not in present:
                scan.problems[None].append(Problem(str(cat_dir / split), "missing split folder"))
        for split in present:
            refs: list[SampleRef] = []
            problems: list[Problem] = []
            defect_dirs = sorted(p for p in (cat_dir / split).iterdir()
                                 if p.is_dir() and _visible(p))
            if not defect_dirs:
                problems.append(Problem(str(cat_dir / split), "split folder holds no images"))
            for folder in defect_dirs:
                if split != "test" and folder.name != GOOD:
                    problems.append(Problem(
                        str(folder), f"the {split} split may only hold '{GOOD}' images"))
                    continue
                folder_refs, folder_problems = _scan_folder(
                    folder, category, split, folder.name, has_xyz)
                refs += folder_refs
                problems += folder_problems
            scan.refs[split] = refs
            scan.problems[split] = problems
        return scan

    def index(self, category: str, split: str) -> list[SampleRef]:
        """Every sample of one category and split, ordered by defect type then stem.

        Reads no pixels. Raises ``DataError`` for a missing split or the first structural
        problem (missing partner file, stray file, empty folder).
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        scan = self._scan(category)
        if scan.problems[None]:
            raise scan.problems[None][0].error()
        if split not in scan.refs:
            raise DataError(self.root / category / split, "missing split folder")
        if scan.problems[split]:
            raise scan.problems[split][0].error()
        return scan.refs[split]

    def samples(self, category: str, split: str, shots: int | None = None,
                shot_mode: str = "first", seed: int = 0) -> Iterator[Sample]:
        """Load the samples of one category and split (optionally a few-shot subset).

        ``shots``/``shot_mode``/``seed`` are passed to ``few_shot``.
        """
        refs = self.index(category, split)
        if shots is not None:
            refs = few_shot(refs, shots, shot_mode, seed)
        for ref in refs:
            yield ref.load()

    def calibration(self, category: str) -> dict | None:
        """The category's ``calibration/camera_parameters.json`` as a dict, or None if absent.

        Keys as MVTec ships them: focus, sx, sy (metres), kappa, cx, cy (pixels), image size.
        """
        path = self._category_dir(category) / CALIBRATION_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(path, f"not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise DataError(path, f"expected a JSON object, got {type(data).__name__}")
        return data


def few_shot(refs: Sequence[SampleRef], n: int, mode: str = "first",
             seed: int = 0) -> list[SampleRef]:
    """``n`` samples per category out of ``refs``, ordered by category then stem.

    mode "first": the first ``n`` by stem (lexicographic, as the CFM authors' code,
    which takes the first n files of a sorted listing). mode "random": a draw without
    replacement from a generator seeded by (``seed``, category), so a category's
    subset does not depend on which other categories are in ``refs``.
    Raises ``DataError`` when a category has fewer than ``n`` samples.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"shots must be a positive integer, got {n!r}")
    if mode not in SHOT_MODES:
        raise ValueError(f"shot mode must be one of {SHOT_MODES}, got {mode!r}")
    by_category: dict[str, list[SampleRef]] = {}
    for ref in refs:
        by_category.setdefault(ref.category, []).append(ref)
    chosen: list[SampleRef] = []
    for category, group in by_category.items():
        group = sorted(group, key=lambda r: (r.stem, r.split, r.defect_type))
        if len(group) < n:
            where = Path(group[0].paths["rgb"]).parents[2]
            raise DataError(where, f"{n} shots requested but only {len(group)} samples exist")
        if mode == "first":
            chosen += group[:n]
        else:
            rng = np.random.default_rng([seed, zlib.crc32(category.encode("utf-8"))])
            picks = np.sort(rng.choice(len(group), size=n, replace=False))
            chosen += [group[i] for i in picks]
    return chosen


def check_dataset(root: str | Path, progress: bool = False) -> list[Problem]:
    """Every problem of the dataset at ``root``: structure, then every file's pixels.

    Does not stop at the first problem. An empty list means the dataset is clean.
    ``progress`` shows a tqdm bar (stderr) over the samples read.
    """
    try:
        ds = MVTec3D(root)
    except DataError as err:
        return [Problem(err.path, err.problem)]
    categories = ds.categories()
    if not categories:
        return [Problem(str(ds.root), "no category folders in the dataset root")]
    problems: list[Problem] = []
    refs: list[SampleRef] = []
    for category in categories:
        scan = ds._scan(category)
        problems += scan.all_problems()
        try:
            ds.calibration(category)
        except DataError as err:
            problems.append(Problem(err.path, err.problem))
        refs += [ref for split_refs in scan.refs.values() for ref in split_refs]
    if progress:
        from tqdm import tqdm

        refs = tqdm(refs, desc="reading samples", unit="sample")
    for ref in refs:
        problems += _read_sample(ref)[1]
    return problems


def summarize(root: str | Path) -> dict:
    """Counts per category / split / defect type, image sizes and has_xyz (no pixel reads).

    Returns ``{"root", "categories": {name: {"has_xyz", "image_sizes": [[H, W], ...],
    "structural_problems", "splits": {split: {"total", "defect_types": {name: n}}}}},
    "totals": {split: n, "all": n}}``. Counts are complete samples (an rgb image with
    every partner it needs); sizes come from the rgb PNG headers. Raises ``DataError``
    for a missing or unusable root.
    """
    ds = MVTec3D(root)
    categories: dict[str, dict] = {}
    totals = {split: 0 for split in SPLITS}
    for category in ds.categories():
        scan = ds._scan(category)
        sizes: set[tuple[int, int]] = set()
        splits: dict[str, dict] = {}
        for split, refs in scan.refs.items():
            per_defect: dict[str, int] = {}
            for ref in refs:
                per_defect[ref.defect_type] = per_defect.get(ref.defect_type, 0) + 1
                try:
                    sizes.add(io.read_png_size(ref.paths["rgb"]))
                except DataError:
                    pass  # an unreadable header is reported by check_dataset, not here
            splits[split] = {"total": len(refs), "defect_types": per_defect}
            totals[split] += len(refs)
        categories[category] = {
            "has_xyz": scan.has_xyz,
            "image_sizes": [list(s) for s in sorted(sizes)],
            "structural_problems": len(scan.all_problems()),
            "splits": splits,
        }
    totals["all"] = sum(totals[s] for s in SPLITS)
    return {"root": str(ds.root), "categories": categories, "totals": totals}
