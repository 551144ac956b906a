"""Planning: group instances into studies and series and choose one series per study.

A :class:`StudyPlan` is small and JSON-safe: it travels through Prefect, into ``run.json`` and
into :func:`medpipe.ingest.ingest_study`. It names studies and series only by one-way hashes.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..config import IngestConfig
from ..keys import study_key as make_study_key
from ..keys import uid_key
from .deid import clean_description
from .mosaic import plan_mosaic
from .scan import FileIssue, Instance, ScanResult, pixel_digest

NON_IMAGE_MODALITIES = {
    "SR": "structured report", "SEG": "segmentation object", "RTSTRUCT": "RT structure set",
    "RTPLAN": "RT plan", "RTRECORD": "RT treatment record", "KO": "key object selection",
    "PR": "presentation state", "ECG": "waveform", "HD": "waveform", "AU": "audio",
    "DOC": "encapsulated document", "REG": "registration", "FID": "fiducials", "RWV": "real world value map",
}


@dataclass
class StudyPlan:
    """What ingest will do with one study. ``files=[]`` with ``skip_reason`` means: skip it."""

    study_key: str
    modality: str
    series_key: str = ""
    series_description: str = ""
    files: list[str] = field(default_factory=list)
    fingerprint: str = ""
    n_slices: int = 0
    selected_because: str = ""
    skipped: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    issues: list[dict[str, Any]] = field(default_factory=list)
    skip_reason: str | None = None
    # Header facts of ``files`` found by the scan, by column (see ``frame_columns``), so that
    # conversion need not parse each header again; empty for enhanced multi-frame objects.
    headers: dict[str, list[Any]] = field(default_factory=dict)
    # Facts a model's domain is checked against (medpipe.inference.domain), from the chosen
    # series' first instance: BodyPartExamined, PhotometricInterpretation, the slice plane and
    # the in-plane field of view in mm (rows x spacing, columns x spacing); empty when unknown.
    body_part: str = ""
    photometric: str = ""
    plane: str | None = None
    field_of_view_mm: list[float] | None = None
    # A Siemens MOSAIC: how to cut ``files[0]`` (its only file) into slices
    # (:class:`~medpipe.ingest.mosaic.Mosaic` as a dict); None for every other series.
    mosaic: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StudyPlan":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def fingerprint(instances: list[Instance]) -> str:
    """A hash over the files' paths, sizes and modification times: changes when any file changes."""
    h = hashlib.sha256()
    for inst in sorted(instances, key=lambda i: i.path):
        h.update(f"{inst.path}\x00{inst.size}\x00{inst.mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def plane_of(orientation: tuple[float, ...] | None) -> str | None:
    """``axial``, ``coronal`` or ``sagittal``: the patient axis closest to the slice normal."""
    if orientation is None:
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


@dataclass
class _Series:
    uid: str
    instances: list[Instance]
    warnings: list[str] = field(default_factory=list)
    mosaic: dict[str, Any] | None = None  # Siemens MOSAIC unpacked: its one file's tiles are the slices

    @property
    def first(self) -> Instance:
        return self.instances[0]

    @property
    def n_slices(self) -> int:
        if self.mosaic:
            return int(self.mosaic["n_images"])
        return sum(i.n_frames for i in self.instances)

    @property
    def thickness(self) -> float:
        values = [i.slice_thickness for i in self.instances if i.slice_thickness]
        return float(np.median(values)) if values else float("inf")


def _dedupe(instances: list[Instance], key: str, cfg: IngestConfig
            ) -> tuple[list[Instance], list[str], list[FileIssue]]:
    """One instance per SOPInstanceUID, deterministically (the first by path).

    Identical copies (same shape, rescale and pixel values) are dropped with one quiet warning;
    copies that differ are a conflict: ``ingest.on_duplicate_conflict=refuse`` drops them all,
    each named in an issue with the others; ``warn`` keeps the first and names kept and dropped.
    Only duplicates are read (their pixel data), so the common case costs nothing.
    """
    by_uid: dict[str, list[Instance]] = defaultdict(list)
    for inst in sorted(instances, key=lambda i: i.path):
        by_uid[inst.sop_uid].append(inst)
    kept: list[Instance] = []
    warnings: list[str] = []
    issues: list[FileIssue] = []
    n_same = 0
    for group in by_uid.values():
        if len(group) > 1 and len({pixel_digest(i, cfg.max_series_voxels) for i in group}) > 1:
            _conflict(group, key, cfg, kept, warnings, issues)
            continue
        kept.append(group[0])
        n_same += len(group) - 1
    if n_same:
        warnings.insert(0, f"dropped {n_same} duplicate instance(s) with the same SOPInstanceUID")
    return kept, warnings, issues


def _conflict(group: list[Instance], key: str, cfg: IngestConfig, kept: list[Instance], warnings: list[str],
              issues: list[FileIssue]) -> None:
    """Apply ``ingest.on_duplicate_conflict`` to files (sorted by path) sharing a SOPInstanceUID."""
    policy = f"ingest.on_duplicate_conflict={cfg.on_duplicate_conflict}"
    if cfg.on_duplicate_conflict == "warn":
        kept.append(group[0])
        warnings.append(f"{len(group)} files share a SOPInstanceUID with different pixel data: kept "
                        f"{group[0].path} (first by path), dropped {', '.join(i.path for i in group[1:])} ({policy})")
        return
    for inst in group:
        others = ", ".join(i.path for i in group if i is not inst)
        issues.append(FileIssue(inst.path, f"SOPInstanceUID shared with different pixel data by {others}; "
                                           f"all {len(group)} dropped ({policy})", key))


def _unusable(series: _Series, cfg: IngestConfig) -> str | None:
    """Why a series cannot be the study's volume, or None if it can."""
    first = series.first
    modality = first.modality
    if not any(i.has_pixels for i in series.instances):
        kind = NON_IMAGE_MODALITIES.get(modality, "object")
        return f"non-image {kind} ({modality}): no pixel data"
    if modality not in cfg.modalities:
        return f"modality {modality} not in ingest.modalities"
    voxels = sum(i.rows * i.columns * i.n_frames for i in series.instances)
    if voxels > cfg.max_series_voxels:
        return f"{voxels:,} voxels, more than ingest.max_series_voxels={cfg.max_series_voxels:,}"
    if all(i.is_localizer for i in series.instances):
        return "localizer series"
    if series.n_slices < cfg.min_slices:
        return f"{series.n_slices} slice(s), fewer than ingest.min_slices={cfg.min_slices}"
    if cfg.series_description and not re.search(cfg.series_description, first.series_description, re.IGNORECASE):
        return "series description does not match ingest.series_description"
    if cfg.orientation != "any":
        plane = plane_of(first.orientation)
        if plane is None and first.n_frames == 1:
            return f"no ImageOrientationPatient, ingest.orientation={cfg.orientation}"
        if plane is not None and plane != cfg.orientation:
            return f"{plane} orientation, ingest.orientation={cfg.orientation}"
    return None


def _rank(series: _Series, cfg: IngestConfig) -> tuple:
    number = series.first.series_number if series.first.series_number is not None else 1 << 30
    if cfg.prefer == "thinnest_slices":
        return (series.thickness, -series.n_slices, number, series.uid)
    return (-series.n_slices, series.thickness, number, series.uid)


def _describe(series: _Series, cfg: IngestConfig) -> dict[str, Any]:
    return {
        "series_key": uid_key(series.uid, cfg.uid_salt),
        "modality": series.first.modality,
        "description": clean_description(series.first.series_description, cfg.keep_descriptions),
        "n_instances": len(series.instances),
        "n_slices": series.n_slices,
    }


def plan_study(study_uid: str, instances: list[Instance], issues: list[FileIssue], cfg: IngestConfig) -> StudyPlan:
    """Plan one study from its instances (all sharing ``study_uid``)."""
    key = make_study_key(study_uid, cfg.uid_salt)
    instances, warnings, conflicts = _dedupe(instances, key, cfg)
    by_series: dict[str, list[Instance]] = defaultdict(list)
    for inst in instances:
        by_series[inst.series_uid].append(inst)
    candidates: list[_Series] = []
    skipped: list[dict[str, Any]] = []
    for uid in sorted(by_series):
        series = _Series(uid, sorted(by_series[uid], key=lambda i: i.path))
        if cfg.skip_localizers and not all(i.is_localizer for i in series.instances):
            n_loc = sum(i.is_localizer for i in series.instances)
            if n_loc:
                series.instances = [i for i in series.instances if not i.is_localizer]
                series.warnings.append(f"removed {n_loc} localizer image(s) mixed into the series")
        _unpack_mosaic(series)
        reason = _unusable(series, cfg)
        if reason:
            skipped.append({**_describe(series, cfg), "reason": reason})
        else:
            candidates.append(series)
    issue_dicts = [i.to_dict() for i in [*issues, *conflicts]]
    if not candidates:
        modality = skipped[0]["modality"] if skipped else ""
        reasons = sorted({s["reason"] for s in skipped}) or ["no readable image file (see issues)"]
        return StudyPlan(study_key=key, modality=modality, skipped=skipped, warnings=warnings,
                         issues=issue_dicts, skip_reason="no usable series: " + "; ".join(reasons))
    candidates.sort(key=lambda s: _rank(s, cfg))
    chosen = candidates[0]
    for other in candidates[1:]:
        why = "fewer slices" if cfg.prefer == "most_slices" else "thicker slices"
        if _rank(other, cfg)[:2] == _rank(chosen, cfg)[:2]:
            why = "same rank, later series number"
        skipped.append({**_describe(other, cfg), "reason": f"not preferred ({why}; ingest.prefer={cfg.prefer})"})
    n = len(candidates)
    if cfg.prefer == "thinnest_slices" and np.isfinite(chosen.thickness):
        because = f"thinnest slices ({chosen.thickness:g} mm) of {n} usable series"
    else:
        because = f"most slices ({chosen.n_slices}) of {n} usable series"
    described = _describe(chosen, cfg)
    return StudyPlan(
        study_key=key,
        modality=chosen.first.modality,
        series_key=described["series_key"],
        series_description=described["description"],
        files=[i.path for i in chosen.instances],
        fingerprint=fingerprint(chosen.instances),
        n_slices=chosen.n_slices,
        selected_because=because,
        skipped=skipped,
        warnings=warnings + chosen.warnings + [
            f"{i.path}: {i.value_warning}; its voxels set to 0 (ingest.on_nonfinite=warn)"
            for i in chosen.instances if i.value_warning],
        issues=issue_dicts,
        headers=frame_columns(chosen.instances),
        body_part=chosen.first.body_part,
        photometric=chosen.first.photometric,
        plane=plane_of(chosen.first.orientation),
        field_of_view_mm=_field_of_view(chosen.first, chosen.mosaic),
        mosaic=chosen.mosaic,
    )


def _unpack_mosaic(series: _Series) -> None:
    """Siemens MOSAIC images tile a volume's slices in one frame: a series of them becomes its
    first file's slices (each file is a volume: a time point or diffusion direction), or stays
    2-D montages when that file cannot be unpacked; warnings say which and why
    (:func:`~medpipe.ingest.mosaic.plan_mosaic`). Other series: one ImageType look per file."""
    if not any("MOSAIC" in i.image_type for i in series.instances):
        return
    series.instances, mosaic, notes = plan_mosaic(series.instances)
    series.mosaic = mosaic.to_dict() if mosaic is not None else None
    series.warnings.extend(notes)


def _field_of_view(inst: Instance, mosaic: dict[str, Any] | None = None) -> list[float] | None:
    """In-plane extent in mm (rows x row spacing, columns x column spacing; a mosaic's: its tile's),
    None without spacing."""
    rows, columns = (mosaic["tile_rows"], mosaic["tile_columns"]) if mosaic else (inst.rows, inst.columns)
    if not inst.pixel_spacing or min(inst.pixel_spacing) <= 0 or not rows or not columns:
        return None  # no spacing, or one that is not positive (radiographs with 0\\0)
    return [round(rows * inst.pixel_spacing[0], 2), round(columns * inst.pixel_spacing[1], 2)]


HEADER_COLUMNS = ("rows", "columns", "samples_per_pixel", "rescale", "position", "orientation", "pixel_spacing",
                  "slice_thickness", "spacing_between", "raw_pixels", "floats")


def frame_columns(instances: list[Instance]) -> dict[str, list[Any]]:
    """The scan's header facts of single-frame ``instances``, one list per field (compact JSON)."""
    if any(i.n_frames != 1 or i.per_frame_groups for i in instances):
        return {}
    return {c: [_plain(getattr(i, c)) for i in instances] for c in HEADER_COLUMNS}


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def plan_studies(scan: ScanResult, cfg: IngestConfig | None = None) -> list[StudyPlan]:
    """Group a scan's instances by study and series and choose one series per study.

    Studies are returned sorted by key. A study whose series are all unusable (only SR, only
    localizers, wrong modality...) gets a plan with ``files=[]`` and a ``skip_reason``; so does a
    study known only from files with issues.
    """
    cfg = cfg or IngestConfig()
    by_study: dict[str, list[Instance]] = defaultdict(list)
    for inst in scan.instances:
        by_study[inst.study_uid].append(inst)
    issues_by_key: dict[str, list[FileIssue]] = defaultdict(list)
    for issue in scan.issues:
        if issue.study_key:
            issues_by_key[issue.study_key].append(issue)
    plans = [plan_study(uid, insts, issues_by_key.get(make_study_key(uid, cfg.uid_salt), []), cfg)
             for uid, insts in by_study.items()]
    known = {p.study_key for p in plans}
    for key, issues in issues_by_key.items():
        if key not in known:
            plans.append(StudyPlan(study_key=key, modality="", issues=[i.to_dict() for i in issues],
                                   skip_reason="no readable image file (see issues)"))
    return sorted(plans, key=lambda p: p.study_key)


def format_plan(plans: list[StudyPlan], issues: list[FileIssue] | list[dict[str, Any]] = (),
                models: Sequence[Any] = ()) -> str:
    """The text ``medpipe plan ARCHIVE`` prints: every study and series, what runs, what not and why.

    ``models`` (:class:`~medpipe.inference.model.ModelInfo` of the enabled models) adds, under
    each study to ingest, which models would run on it and why the others would not.
    """
    n_skip = sum(1 for p in plans if not p.files)
    lines = [f"{len(plans)} studies: {len(plans) - n_skip} to ingest, {n_skip} to skip"]
    if models:
        lines.append("models: " + "; ".join(f"{m.name} ({m.applies_to().summary()})" for m in models))
    for p in plans:
        if p.files:
            desc = f' "{p.series_description}"' if p.series_description else ""
            lines.append(f"study {p.study_key}  {p.modality:<3} INGEST series {p.series_key}{desc}: "
                         f"{p.n_slices} slice(s) in {len(p.files)} file(s); {p.selected_because}")
            lines.extend(_model_lines(p, models))
        else:
            lines.append(f"study {p.study_key}  {p.modality or '?':<3} SKIP   {p.skip_reason}")
        for s in p.skipped:
            desc = f' "{s["description"]}"' if s.get("description") else ""
            lines.append(f"    skip series {s['series_key']} {s['modality']}{desc} "
                         f"({s['n_slices']} slice(s)): {s['reason']}")
        for w in p.warnings:
            lines.append(f"    warning: {w}")
        for i in p.issues:
            lines.append(f"    file issue: {i['path']}: {i['reason']}")
    loose = [i if isinstance(i, dict) else i.to_dict() for i in issues]
    loose = [i for i in loose if not i.get("study_key")]
    if loose:
        lines.append(f"{len(loose)} file(s) outside any study:")
        lines.extend(f"    {i['path']}: {i['reason']}" for i in loose)
    return "\n".join(lines)


def _model_lines(plan: StudyPlan, models: Sequence[Any]) -> list[str]:
    """One line per model: RUN or NOT APPLICABLE, with the domain match's reason."""
    if not models:
        return []
    from ..inference.domain import Facts, match  # the domain rules live with the models

    facts = Facts.from_plan(plan)
    lines = []
    for m in models:
        ok, why = match(m.applies_to(), facts)
        lines.append(f"    model {m.name}: {'RUN' if ok else 'NOT APPLICABLE'} ({why})")
    return lines
