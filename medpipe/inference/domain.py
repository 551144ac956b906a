"""What a model applies to (its domain) and whether a study's facts fall inside it.

A model declares its domain in its model card (``"domain": {...}``) or in the configuration
(``model.domain`` / ``models[i].domain``, whose keys override the card's): modalities, body
part, slice orientation, minimum number of slices, in-plane field of view, photometric
interpretation and a series-description pattern. :func:`match` compares a study's
:class:`Facts` (from its plan, refined by the ingested volume) with a :class:`Domain` and
says why not, rule by rule.

Missing facts
-------------
A rule on a fact the study does not have (no BodyPartExamined, no ImageOrientationPatient, no
PixelSpacing...) does **not** match: a chest model is not run on a study that may be a head,
and the reason says which fact is missing. A domain that accepts such studies says so with
``allow_unknown: [body_part, ...]``. A rule left at its default (any) needs no fact.

Body parts are compared through synonym groups (CHEST = THORAX = LUNG, HEAD = BRAIN = SKULL,
...), and a combined region (CHESTABDOMEN, HEADNECK, WHOLEBODY) covers each of its parts.

>>> d = Domain(modalities=["CT"], body_parts=["CHEST"], orientation="axial", min_slices=16)
>>> match(d, Facts("CT", body_part="THORAX", orientation="axial", n_slices=48))
(True, 'CT, body part THORAX (CHEST), axial, 48 slices')
>>> match(d, Facts("CT", body_part=None, orientation="axial", n_slices=1))[1]
'no BodyPartExamined (body part unknown, the model needs CHEST); 1 slice(s), fewer than 16'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Fact = Literal["body_part", "orientation", "field_of_view", "photometric", "series_description"]

# Synonym groups of BodyPartExamined values (PS3.16 Annex L terms and common free text).
BODY_PART_SYNONYMS: dict[str, frozenset[str]] = {
    "CHEST": frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "THORACIC", "PULMONARY"}),
    "HEAD": frozenset({"HEAD", "BRAIN", "SKULL", "CRANIUM", "CEREBRUM"}),
    "NECK": frozenset({"NECK", "CSPINE", "CERVICAL"}),
    "ABDOMEN": frozenset({"ABDOMEN", "ABDOMINAL", "ABD", "LIVER", "KIDNEY", "PANCREAS"}),
    "PELVIS": frozenset({"PELVIS", "PELVIC", "HIP", "BLADDER", "PROSTATE"}),
    "HEART": frozenset({"HEART", "CARDIAC", "CORONARY"}),
    "BREAST": frozenset({"BREAST", "MAMMA"}),
    "EXTREMITY": frozenset({"EXTREMITY", "ARM", "LEG", "HAND", "FOOT", "KNEE", "SHOULDER", "ELBOW", "ANKLE",
                            "WRIST"}),
    "SPINE": frozenset({"SPINE", "TSPINE", "LSPINE", "VERTEBRA"}),
}
# Combined regions cover each of their parts.
COMBINED_REGIONS: dict[str, frozenset[str]] = {
    "CHESTABDOMEN": frozenset({"CHEST", "ABDOMEN"}),
    "CHESTABDPELVIS": frozenset({"CHEST", "ABDOMEN", "PELVIS"}),
    "ABDOMENPELVIS": frozenset({"ABDOMEN", "PELVIS"}),
    "ABDPELVIS": frozenset({"ABDOMEN", "PELVIS"}),
    "HEADNECK": frozenset({"HEAD", "NECK"}),
    "WHOLEBODY": frozenset(BODY_PART_SYNONYMS),
}
PHOTOMETRIC = frozenset({"MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422",
                         "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT"})


def _term(text: str) -> str:
    """A body-part term as compared: upper case, without spaces, hyphens or underscores."""
    return re.sub(r"[\s_\-]+", "", str(text).upper())


def regions(body_part: str) -> frozenset[str]:
    """The canonical regions a BodyPartExamined value names (itself when no group knows it).

    >>> sorted(regions("Thorax")), sorted(regions("CHEST_ABDOMEN")), sorted(regions("FOO"))
    (['CHEST'], ['ABDOMEN', 'CHEST'], ['FOO'])
    """
    term = _term(body_part)
    if term in COMBINED_REGIONS:
        return COMBINED_REGIONS[term]
    found = frozenset(name for name, words in BODY_PART_SYNONYMS.items() if term in words)
    return found or frozenset({term})


class Domain(BaseModel):
    """The studies a model applies to. Every rule left at its default accepts any study.

    Attributes
    ----------
    modalities : list of str, optional
        DICOM modalities; None: the model's ``modalities`` (configuration, card, else CT).
    body_parts : list of str
        BodyPartExamined values (or regions) accepted, through synonym groups; [] any.
    synonyms : list of str
        More BodyPartExamined values accepted as they are (site-specific terms).
    orientation : {"any", "axial", "coronal", "sagittal"}
        The slice plane, from ImageOrientationPatient.
    min_slices : int
        Fewest slices (frames) of the volume.
    field_of_view_mm : (float, float), optional
        Range of the in-plane extent (rows x spacing, columns x spacing), both axes, in mm.
    photometric : list of str
        PhotometricInterpretation values accepted; [] any.
    series_description : str, optional
        Regular expression (case-insensitive) the series description must contain; it is matched
        against the description the plan keeps (acquisition terms only unless
        ``ingest.keep_descriptions``).
    allow_unknown : list of str
        Facts whose absence does not exclude a study (``body_part``, ``orientation``,
        ``field_of_view``, ``photometric``, ``series_description``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    modalities: list[str] | None = None
    body_parts: list[str] = Field(default_factory=list)
    synonyms: list[str] = Field(default_factory=list)
    orientation: Literal["any", "axial", "coronal", "sagittal"] = "any"
    min_slices: int = Field(1, ge=1)
    field_of_view_mm: tuple[float, float] | None = None
    photometric: list[str] = Field(default_factory=list)
    series_description: str | None = None
    allow_unknown: list[Fact] = Field(default_factory=list)

    @field_validator("modalities", "photometric")
    @classmethod
    def _upper(cls, values: list[str] | None) -> list[str] | None:
        return None if values is None else [str(v).strip().upper() for v in values]

    @field_validator("photometric")
    @classmethod
    def _known_photometric(cls, values: list[str]) -> list[str]:
        unknown = sorted(set(values) - PHOTOMETRIC)
        if unknown:
            raise ValueError(f"unknown photometric interpretation(s) {unknown}; expected some of {sorted(PHOTOMETRIC)}")
        return values

    @field_validator("series_description")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"series_description {pattern!r} is not a regular expression: {exc}") from None
        return pattern

    @model_validator(mode="after")
    def _fov_range(self) -> "Domain":
        if self.field_of_view_mm is not None:
            low, high = self.field_of_view_mm
            if not 0 <= low <= high:
                raise ValueError(f"field_of_view_mm {list(self.field_of_view_mm)} must be (min, max) with "
                                 "0 <= min <= max")
        return self

    def summary(self) -> str:
        """One line for ``medpipe plan`` and reports.

        >>> Domain(modalities=["CT"], body_parts=["CHEST"], orientation="axial", min_slices=16).summary()
        'CT, body part CHEST, axial, >= 16 slices'
        """
        parts = [", ".join(self.modalities) if self.modalities else "any modality"]
        if self.body_parts:
            parts.append("body part " + "/".join(self.body_parts))
        if self.orientation != "any":
            parts.append(self.orientation)
        if self.min_slices > 1:
            parts.append(f">= {self.min_slices} slices")
        if self.field_of_view_mm:
            parts.append(f"field of view {self.field_of_view_mm[0]:g}-{self.field_of_view_mm[1]:g} mm")
        if self.photometric:
            parts.append("/".join(self.photometric))
        if self.series_description:
            parts.append(f"series /{self.series_description}/")
        return ", ".join(parts)


@dataclass(frozen=True)
class Facts:
    """What is known of a study for :func:`match`; None: the study does not say."""

    modality: str
    body_part: str | None = None
    orientation: str | None = None
    n_slices: int | None = None
    field_of_view_mm: tuple[float, float] | None = None
    photometric: str | None = None
    series_description: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["field_of_view_mm"] = None if self.field_of_view_mm is None else list(self.field_of_view_mm)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Facts":
        fov = d.get("field_of_view_mm")
        return cls(modality=str(d.get("modality") or ""), body_part=d.get("body_part") or None,
                   orientation=d.get("orientation") or None,
                   n_slices=None if d.get("n_slices") is None else int(d["n_slices"]),
                   field_of_view_mm=None if fov is None else (float(fov[0]), float(fov[1])),
                   photometric=d.get("photometric") or None,
                   series_description=d.get("series_description"))

    @classmethod
    def from_plan(cls, plan: Any) -> "Facts":
        """The facts of a :class:`~medpipe.ingest.plan.StudyPlan` (or its dict)."""
        get = plan.get if isinstance(plan, Mapping) else lambda k, default=None: getattr(plan, k, default)
        fov = get("field_of_view_mm")
        return cls(modality=str(get("modality") or ""), body_part=get("body_part") or None,
                   orientation=get("plane") or None, n_slices=get("n_slices") or None,
                   field_of_view_mm=None if not fov else (float(fov[0]), float(fov[1])),
                   photometric=get("photometric") or None,
                   series_description=get("series_description"))


def _unknown(what: str, fact: Fact, domain: Domain, need: str) -> str | None:
    """The reason a missing fact excludes the study, or None when the domain allows it."""
    if fact in domain.allow_unknown:
        return None
    return f"{what} ({fact.replace('_', ' ')} unknown, the model needs {need})"


def _body_part(domain: Domain, facts: Facts) -> str | None:
    if not domain.body_parts:
        return None
    need = "/".join(domain.body_parts)
    if not facts.body_part:
        return _unknown("no BodyPartExamined", "body_part", domain, need)
    wanted = frozenset().union(*(regions(b) for b in domain.body_parts))
    if regions(facts.body_part) & wanted or _term(facts.body_part) in {_term(s) for s in domain.synonyms}:
        return None
    return f"body part {facts.body_part}, the model needs {need}"


def _problems(domain: Domain, facts: Facts) -> list[str]:
    """Every rule ``facts`` break, in the order of the domain's fields."""
    out: list[str | None] = []
    if domain.modalities and facts.modality not in domain.modalities:
        out.append(f"modality {facts.modality or '?'} is not covered (covers {', '.join(domain.modalities)})")
    out.append(_body_part(domain, facts))
    if domain.orientation != "any":
        if facts.orientation is None:
            out.append(_unknown("no ImageOrientationPatient", "orientation", domain, domain.orientation))
        elif facts.orientation != domain.orientation:
            out.append(f"{facts.orientation} slices, the model needs {domain.orientation}")
    if domain.min_slices > 1 and (facts.n_slices or 0) < domain.min_slices:
        out.append(f"{facts.n_slices or 0} slice(s), fewer than {domain.min_slices}")
    if domain.field_of_view_mm is not None:
        low, high = domain.field_of_view_mm
        if facts.field_of_view_mm is None:
            out.append(_unknown("no pixel spacing", "field_of_view", domain, f"{low:g}-{high:g} mm"))
        elif not all(low <= f <= high for f in facts.field_of_view_mm):
            fov = facts.field_of_view_mm
            out.append(f"field of view {fov[0]:.0f} x {fov[1]:.0f} mm, the model needs {low:g}-{high:g} mm")
    if domain.photometric:
        if not facts.photometric:
            out.append(_unknown("no PhotometricInterpretation", "photometric", domain, "/".join(domain.photometric)))
        elif facts.photometric.upper() not in domain.photometric:
            out.append(f"photometric interpretation {facts.photometric}, the model needs "
                       f"{'/'.join(domain.photometric)}")
    if domain.series_description:
        if not facts.series_description:
            out.append(_unknown("no series description", "series_description", domain,
                                f"/{domain.series_description}/"))
        elif not re.search(domain.series_description, facts.series_description, re.IGNORECASE):
            out.append(f"series description does not match /{domain.series_description}/")
    return [p for p in out if p]


def match(domain: Domain, facts: Facts) -> tuple[bool, str]:
    """Whether a study with ``facts`` lies in ``domain``, and why (or why not).

    Parameters
    ----------
    domain : Domain
    facts : Facts

    Returns
    -------
    (bool, str)
        True and the facts that matched, or False and every rule broken, joined by "; ".

    Examples
    --------
    >>> match(Domain(modalities=["CT"]), Facts("US", photometric="RGB"))
    (False, 'modality US is not covered (covers CT)')
    >>> match(Domain(body_parts=["HEAD"], allow_unknown=["body_part"]), Facts("MR"))
    (True, 'MR, body part unknown (allowed)')
    """
    problems = _problems(domain, facts)
    if problems:
        return False, "; ".join(problems)
    said = [facts.modality or "?"]
    if domain.body_parts:
        if facts.body_part:
            canon = "/".join(sorted(regions(facts.body_part)))
            said.append(f"body part {facts.body_part}" + (f" ({canon})" if canon != _term(facts.body_part) else ""))
        else:
            said.append("body part unknown (allowed)")
    if domain.orientation != "any":
        said.append(facts.orientation or "orientation unknown (allowed)")
    if domain.min_slices > 1:
        said.append(f"{facts.n_slices} slices")
    return True, ", ".join(said)


def merged_domain(card_domain: Mapping[str, Any] | None, config_domain: Mapping[str, Any] | None,
                  modalities: list[str] | tuple[str, ...]) -> Domain:
    """The model's domain: the card's, with the configuration's keys over it; ``modalities``
    where neither names any."""
    data = {**(card_domain or {}), **(config_domain or {})}
    if not data.get("modalities"):
        data["modalities"] = list(modalities)
    return Domain.model_validate(data)
