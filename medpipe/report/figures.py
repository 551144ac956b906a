"""Pictures of a study for report.html: key slices with the segmentation overlaid, maximum
intensity projections, three orthogonal views, saliency maps, a slice-score chart.

Everything is read from the study folder (``image.zarr`` and ``saliency/*.png``) at a pyramid
level whose slices fit in about ``max_px`` pixels, and only the slices needed are read. Pictures
are returned as base64 PNG strings ready for ``<img src="data:image/png;base64,...">``.
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
import zarr
from PIL import Image
from scipy import ndimage as ndi

from .. import omezarr

log = logging.getLogger(__name__)

CT_WINDOW = (-1100.0, 500.0)  # one window that shows lung, soft tissue and bone together


@dataclass
class Figure:
    title: str
    png: str  # base64
    caption: str = ""
    width: int = 0
    height: int = 0


@dataclass
class StudyFigures:
    key_slices: list[Figure] = field(default_factory=list)
    orthogonal: list[Figure] = field(default_factory=list)
    mips: list[Figure] = field(default_factory=list)
    saliency: list[Figure] = field(default_factory=list)
    legend: list[dict[str, Any]] = field(default_factory=list)
    window: str = ""
    problems: list[str] = field(default_factory=list)


def png_base64(rgb: np.ndarray) -> str:
    """Encode an (H, W) or (H, W, 3) uint8 array as base64 PNG.

    zlib's default level, without Pillow's ``optimize`` (which searches the strongest
    compression): about 10x faster to encode, files about 10% larger.
    """
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def choose_level(image_path: Path, max_px: int) -> int:
    """The finest pyramid level whose rows and columns are at most ``max_px`` (else the coarsest)."""
    meta = omezarr.read_meta(image_path)
    for level in range(meta.levels):
        shape = zarr.open_array(str(image_path / str(level)), mode="r").shape
        if max(shape[1:]) <= max_px:
            return level
    return meta.levels - 1


def label_colors(image_path: Path, name: str = omezarr.LABELS_NAME) -> dict[int, tuple[int, int, int]]:
    """RGB colour of each label value from the label image's OME ``image-label.colors``."""
    group = zarr.open_group(str(image_path / "labels" / name), mode="r")
    colors = group.attrs.get("ome", {}).get("image-label", {}).get("colors", [])
    return {int(c["label-value"]): tuple(int(v) for v in c["rgba"][:3]) for c in colors}


def display_range(sample: np.ndarray, modality: str | None) -> tuple[float, float]:
    """CT: a fixed HU window; other modalities: the 1st to 99.5th percentile of the sample."""
    if modality == "CT":
        return CT_WINDOW
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return (0.0, 1.0)
    lo, hi = np.percentile(finite, [1.0, 99.5])
    return (float(lo), float(hi) if hi > lo else float(lo) + 1.0)


def to_gray(img: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    out = (np.nan_to_num(img.astype(np.float32), nan=lo) - lo) / (hi - lo)
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def overlay(gray: np.ndarray, labels: np.ndarray | None, colors: dict[int, tuple[int, int, int]],
            alpha: float = 0.12, strong: tuple[int, ...] = (), strong_alpha: float = 0.45) -> np.ndarray:
    """Grey image with each label outlined in its colour and lightly filled (``strong`` labels,
    such as lesions, filled at ``strong_alpha`` so that they stand out)."""
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    if labels is not None:
        for value in np.unique(labels):
            if value == 0 or int(value) not in colors:
                continue
            mask = labels == value
            color = np.asarray(colors[int(value)], np.float32)
            a = strong_alpha if int(value) in strong else alpha
            rgb[mask] = (1 - a) * rgb[mask] + a * color
            edge = mask & ~ndi.binary_erosion(mask)
            rgb[edge] = color
    return rgb.astype(np.uint8)


def physical_resize(rgb: np.ndarray, spacing_rc: tuple[float, float], target: int = 360,
                    max_px: int = 512) -> np.ndarray:
    """Resize so that pixels are square in millimetres and the longer side is about ``target``."""
    h_mm, w_mm = rgb.shape[0] * spacing_rc[0], rgb.shape[1] * spacing_rc[1]
    scale = min(target, max_px) / max(h_mm, w_mm)
    size = (max(1, round(w_mm * scale)), max(1, round(h_mm * scale)))
    if size == (rgb.shape[1], rgb.shape[0]):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


# Figures read in the calling thread: the slices and the coarse level are small, and through the
# run's cluster (the default scheduler in a study task) each read would be tasks on other
# workers and arrays sent back. Each compute says so itself: dask.config is one per process, and
# setting the scheduler there would also send other studies' computations in this worker (their
# arrays held on the cluster) to the local scheduler.
LOCAL = "sync"


class _Volume:
    """Lazy access to the image and labels of one pyramid level (reads only what is asked)."""

    def __init__(self, image_path: Path, level: int):
        self.image = omezarr.read_image(image_path, level)
        self.shape = tuple(self.image.shape)
        self._planes: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]] = {}
        try:
            self.labels = omezarr.read_labels(image_path, level=level)
            self.labels = self.labels[tuple(slice(0, n) for n in self.shape)]
            if tuple(self.labels.shape) != self.shape:
                self.labels = None
        except Exception:  # a missing or broken label image only costs the overlays
            self.labels = None

    def plane(self, axis: int, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The image and labels of one plane (read once: several figures show the same slice)."""
        index = int(np.clip(index, 0, self.shape[axis] - 1))
        if (axis, index) not in self._planes:
            sl: list[Any] = [slice(None)] * 3
            sl[axis] = index
            img, lab = dask.compute(self.image[tuple(sl)], None if self.labels is None else self.labels[tuple(sl)],
                                    scheduler=LOCAL)
            self._planes[(axis, index)] = (np.asarray(img), None if lab is None else np.asarray(lab))
        return self._planes[(axis, index)]


def _is_lesion(name: str) -> bool:
    name = name.lower()
    return any(w in name for w in ("lesion", "tumor", "tumour", "nodule", "mass"))


def _superior_up(affine: np.ndarray) -> bool:
    """True when increasing slice index points to the patient's head (then flip z for display)."""
    return bool(affine[2, 2] > 0)


def _saliency(study_dir: Path, record: dict[str, Any], max_px: int) -> tuple[list[Figure], list[str]]:
    figs, problems = [], []
    root = study_dir.resolve()
    for item in ((record.get("model") or {}).get("saliency") or []):
        path = (study_dir / item["png"]).resolve()
        if root not in path.parents or not path.is_file():
            problems.append(f"saliency map {item['png']} not found in the study folder")
            continue
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if max(im.size) > max_px:
                    im.thumbnail((max_px, max_px))
                elif max(im.size) < 240:  # small maps are enlarged to be seen, pixels kept sharp
                    k = 240 / max(im.size)
                    im = im.resize((round(im.size[0] * k), round(im.size[1] * k)), Image.Resampling.NEAREST)
                arr = np.asarray(im)
        except OSError as exc:
            problems.append(f"saliency map {item['png']} unreadable: {exc}")
            continue
        score = item.get("score")
        caption = f"slice {item['slice'] + 1}" + (f", score {score:.3f}" if isinstance(score, (int, float)) else "")
        figs.append(Figure(f"Saliency, slice {item['slice'] + 1}", png_base64(arr), caption, arr.shape[1], arr.shape[0]))
    return figs, problems


def _key_slice_indices(vol: _Volume, names: dict[int, str], record: dict[str, Any], n0: int,
                       coarse: _Volume | None = None) -> list[tuple[int, str]]:
    """Up to three slices (level coordinates) worth showing, each with why.

    The largest lesion cross-section is looked for on ``coarse`` (a coarser level, read whole
    cheaply), then among the slices of ``vol`` inside the coarse slice found.
    """
    nz = vol.shape[0]
    picks: list[tuple[int, str]] = []
    search = coarse if coarse is not None and coarse.labels is not None else vol
    if vol.labels is not None and search.labels is not None:
        lesion = [v for v, n in names.items() if _is_lesion(n)]
        if lesion:
            area = np.asarray(search.labels.map_blocks(np.isin, lesion, dtype=bool).sum(axis=(1, 2))
                              .compute(scheduler=LOCAL))
            if area.max() > 0:
                z = int(area.argmax())
                if search is not vol:  # the fine slices inside the coarse one
                    lo = z * nz // search.shape[0]
                    hi = max(lo + 1, min(nz, (z + 1) * nz // search.shape[0]))
                    fine = np.isin(np.asarray(vol.labels[lo:hi]), lesion).sum(axis=(1, 2))
                    z = lo + int(fine.argmax())
                picks.append((z, "largest lesion cross-section"))
    scores = ((record.get("model") or {}).get("outputs") or {}).get("slice_scores") or []
    valid = [(s, i) for i, s in enumerate(scores) if isinstance(s, (int, float))]
    if valid:
        s, i0 = max(valid)
        picks.append((min(nz - 1, int(i0 * nz / max(n0, 1))), f"highest model score ({s:.2f})"))
    picks.append((nz // 2, "middle of the volume"))
    out, seen = [], set()
    for z, why in picks:
        if z not in seen:
            seen.add(z)
            out.append((z, why))
    return out[:3]


def study_figures(study_dir: str | Path, record: dict[str, Any], max_px: int = 512) -> StudyFigures:
    """All pictures of a study's report; problems (missing image, unreadable PNG) are listed, not raised."""
    study_dir = Path(study_dir)
    figs = StudyFigures()
    figs.saliency, problems = _saliency(study_dir, record, max_px)
    figs.problems.extend(problems)
    image_path = study_dir / "image.zarr"
    if not (image_path / "zarr.json").is_file():
        if record.get("status") == "ok":
            figs.problems.append("image.zarr not found: no pictures of the image")
        return figs
    try:
        _image_figures(image_path, record, figs, max_px)
    except Exception as exc:  # pictures are a convenience: never fail a report for them
        log.warning("report pictures of %s failed: %s", study_dir, exc)
        figs.problems.append(f"pictures of the image could not be made: {exc}")
    return figs


def _image_figures(image_path: Path, record: dict[str, Any], figs: StudyFigures, max_px: int) -> None:
    meta = omezarr.read_meta(image_path)
    level = choose_level(image_path, max_px)
    vol = _Volume(image_path, level)
    n0 = meta.shape[0]
    sz, sy, sx = (meta.spacing[i] * meta.shape[i] / vol.shape[i] for i in range(3))
    modality = record.get("modality")
    try:
        names = omezarr.label_names(image_path) if vol.labels is not None else {}
        colors = label_colors(image_path) if vol.labels is not None else {}
    except Exception:
        names, colors = {}, {}
    # CT has a fixed window; other modalities a range from the middle slice
    window = CT_WINDOW if modality == "CT" else display_range(vol.plane(0, vol.shape[0] // 2)[0], modality)
    figs.window = (f"W {window[1] - window[0]:.0f} / L {(window[0] + window[1]) / 2:.0f} HU" if modality == "CT"
                   else f"{window[0]:.4g} to {window[1]:.4g} (1st to 99.5th percentile)")
    present = set()

    lesion = [v for v, n in names.items() if _is_lesion(n)]

    def render(img: np.ndarray, lab: np.ndarray | None, spacing_rc: tuple[float, float], flip: bool,
               target: int = 340) -> Figure:
        if lab is not None:
            present.update(int(v) for v in np.unique(lab) if v)
        rgb = overlay(to_gray(img, window), lab, colors, strong=tuple(lesion))
        if flip:
            rgb = rgb[::-1]
        rgb = physical_resize(rgb, spacing_rc, target=target, max_px=max_px)
        return Figure("", png_base64(rgb), "", rgb.shape[1], rgb.shape[0])

    def z0(z: int) -> int:  # slice number at full resolution, 1-based
        return min(n0, int((z + 0.5) * n0 / vol.shape[0]) + 1)

    flip = _superior_up(meta.affine)
    # Views through the whole volume (coronal, sagittal, projections) and the lesion search read
    # a coarse level: at the fine one, each would read and decompress every chunk of the volume.
    mlevel = choose_level(image_path, min(max_px, 256))
    mvol = vol if mlevel == level else _Volume(image_path, mlevel)
    picks = _key_slice_indices(vol, names, record, n0, coarse=mvol)
    for z, why in picks:
        img, lab = vol.plane(0, z)
        f = render(img, lab, (sy, sx), False)
        f.title, f.caption = f"Axial slice {z0(z)} of {n0}", why
        figs.key_slices.append(f)

    # Orthogonal views through the centre of the largest lesion candidate, else the volume centre.
    centre = [n // 2 for n in vol.shape]
    why = "through the volume centre"
    if picks and vol.labels is not None and "lesion" in picks[0][1]:
        z = picks[0][0]
        _, lab = vol.plane(0, z)
        mask = np.isin(lab, lesion)
        if mask.any():
            cy, cx = ndi.center_of_mass(mask)
            centre, why = [z, int(round(cy)), int(round(cx))], "through the largest lesion"
    msz, msy, msx = (meta.spacing[i] * meta.shape[i] / mvol.shape[i] for i in range(3))
    for axis, name, sp, msp in ((0, "Axial", (sy, sx), None), (1, "Coronal", (sz, sx), (msz, msx)),
                                (2, "Sagittal", (sz, sy), (msz, msy))):
        if axis == 0:
            img, lab = vol.plane(axis, centre[axis])
        else:  # the coarse level's plane through the same point
            sp = msp
            img, lab = mvol.plane(axis, centre[axis] * mvol.shape[axis] // vol.shape[axis])
        f = render(img, lab, sp, flip and axis > 0, target=300)
        f.title, f.caption = name, why
        figs.orthogonal.append(f)

    # Maximum intensity projections on the coarse level (whole volume read, so keep it small),
    # all of them in one pass over its chunks.
    axes = range(3)
    outlined = mvol.labels is not None and lesion
    lesion_mask = mvol.labels.map_blocks(np.isin, lesion, dtype=bool) if outlined else None
    projections = dask.compute(*[mvol.image.max(axis=a) for a in axes],
                               *([lesion_mask.any(axis=a) for a in axes] if outlined else []), scheduler=LOCAL)
    for axis, name, sp in ((0, "Axial MIP", (msy, msx)), (1, "Coronal MIP", (msz, msx)), (2, "Sagittal MIP", (msz, msy))):
        mip = np.asarray(projections[axis])
        lab = np.where(np.asarray(projections[3 + axis]), lesion[0], 0) if outlined else None
        rgb = overlay(to_gray(mip, window if modality != "CT" else (-200.0, 1200.0)), lab, colors, alpha=0.5)
        if flip and axis > 0:
            rgb = rgb[::-1]
        rgb = physical_resize(rgb, sp, target=240, max_px=max_px)
        figs.mips.append(Figure(name, png_base64(rgb), "lesions outlined" if lab is not None and lab.any() else "",
                                rgb.shape[1], rgb.shape[0]))

    figs.legend = [
        {"value": v, "name": names.get(v, str(v)), "color": "#%02x%02x%02x" % colors[v]}
        for v in sorted(colors) if v in names and v != 0
    ]
    for item in figs.legend:
        item["shown"] = item["value"] in present


def score_chart_svg(scores: list[float | None], width: int = 640, height: int = 120,
                    threshold: float | None = 0.5) -> str:
    """Slice scores as a small inline SVG bar chart (numbers only, so safe to embed unescaped)."""
    vals = [float(s) if isinstance(s, (int, float)) else 0.0 for s in scores]
    if not vals:
        return ""
    n, pad = len(vals), 24
    bw = (width - pad) / n
    bars = []
    for i, v in enumerate(vals):
        h = max(0.0, min(1.0, v)) * (height - pad)
        color = "#c0392b" if threshold is not None and v >= threshold else "#5b7fa6"
        bars.append(f'<rect x="{pad + i * bw:.2f}" y="{height - pad / 2 - h:.2f}" width="{max(bw - 0.5, 0.5):.2f}" '
                    f'height="{h:.2f}" fill="{color}"><title>slice {i + 1}: {v:.3f}</title></rect>')
    y_thr = height - pad / 2 - (threshold or 0) * (height - pad)
    thr = (f'<line x1="{pad}" x2="{width}" y1="{y_thr:.1f}" y2="{y_thr:.1f}" stroke="#999" stroke-dasharray="4 3"/>'
           if threshold is not None else "")
    axis = (f'<text x="0" y="{pad / 2 + 4:.0f}" font-size="10" fill="#666">1.0</text>'
            f'<text x="0" y="{height - pad / 2:.0f}" font-size="10" fill="#666">0</text>'
            f'<text x="{pad}" y="{height - 1}" font-size="10" fill="#666">slice 1</text>'
            f'<text x="{width}" y="{height - 1}" font-size="10" fill="#666" text-anchor="end">slice {n}</text>')
    return (f'<svg viewBox="0 0 {width} {height}" width="100%" '
            f'style="max-width:{width}px" role="img" aria-label="slice scores">{"".join(bars)}{thr}{axis}</svg>')
