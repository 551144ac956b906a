"""What of a DICOM header may leave medpipe: an allow-list, never a block-list.

Outputs carry only the technical facts listed here. Everything the DICOM PS3.15 Annex E
basic profile removes (names, IDs, birth date, accession number, institution, physicians,
operators, device serial number, station name, dates, free-text comments, private tags) is
simply never copied; UIDs appear only as :func:`medpipe.keys.uid_key` hashes.

Series descriptions are free text, which the basic profile removes too. By default only a
*cleaned* description is kept: tokens from a vocabulary of acquisition terms and short
numbers (``"AX T1 POST 3MM"``), everything else dropped; ``keep_descriptions`` keeps them whole.
"""

from __future__ import annotations

import re
from typing import Any

# Acquisition vocabulary allowed in cleaned descriptions (upper case).
_VOCAB = frozenset(
    """
    AX AXI AXIAL COR CORONAL SAG SAGITTAL OBL OBLIQUE TRA TRANSVERSE 2D 3D MPR MIP MINIP VR RECON
    T1 T2 PD FLAIR STIR DWI DTI ADC SWI GRE SE TSE FSE EPI MPRAGE SPACE VIBE BOLD PERF TOF MRA
    CT CTA PET MR MRI NM SPECT CR DX MG US SC XA RF
    HEAD BRAIN NECK CHEST THORAX LUNG LUNGS ABDOMEN ABD PELVIS SPINE CSPINE TSPINE LSPINE KNEE HIP
    HAND FOOT SHOULDER CARDIAC HEART LIVER KIDNEY WHOLE BODY WB EXTREMITY BREAST
    BONE SOFT TISSUE STANDARD STD SHARP SMOOTH LUNG MEDIASTINUM KERNEL B30F B70F B31F I30F
    THIN THICK SLICE SLICES MM CM KV MAS HELICAL SPIRAL LOCALIZER SCOUT TOPOGRAM SURVIEW
    PRE POST CONTRAST C NC ARTERIAL VENOUS PORTAL DELAYED NATIVE PHASE FAT SAT FS WATER IN OPP
    GD GAD DYNAMIC ISO ISOTROPIC HR HIGH RES LOW DOSE LD ROUTINE SPLIT PA AP LAT LATERAL PORTABLE
    TEMPLATE MNI152 PHANTOM SAMPLE SERIES IMAGE IMAGES MAP ENHANCED ORIGINAL DERIVED PRIMARY
    """.split()
)
_NUMBER = re.compile(r"^\d{1,3}(\.\d{1,3})?(MM|CM|KV|S)?$")
_TOKEN = re.compile(r"[A-Za-z0-9.+]+")


def clean_description(text: str | None, keep: bool = False) -> str:
    """A series description reduced to acquisition vocabulary (or kept whole with ``keep``).

    >>> clean_description("AX T1 post 3mm  Dr Smith 12345678")
    'AX T1 POST 3MM'
    >>> clean_description("CANARY-7f3a")
    ''
    """
    if not text:
        return ""
    if keep:
        return str(text).strip()
    kept = []
    for token in _TOKEN.findall(str(text)):
        up = token.upper().rstrip("+")
        if up in _VOCAB or _NUMBER.match(up):
            kept.append(token.upper())
    return " ".join(kept)


# (keyword, output name, cast). None of these is in the Annex E basic profile.
_SOURCE_FACTS: list[tuple[str, str, type]] = [
    ("Manufacturer", "manufacturer", str),
    ("ManufacturerModelName", "manufacturer_model", str),
    ("SliceThickness", "slice_thickness_mm", float),
    ("SpacingBetweenSlices", "spacing_between_slices_mm", float),
    ("KVP", "kvp", float),
    ("XRayTubeCurrent", "tube_current_ma", float),
    ("ConvolutionKernel", "convolution_kernel", str),
    ("MagneticFieldStrength", "field_strength_t", float),
    ("RepetitionTime", "repetition_time_ms", float),
    ("EchoTime", "echo_time_ms", float),
    ("FlipAngle", "flip_angle_deg", float),
    ("PhotometricInterpretation", "photometric", str),
    ("BitsStored", "bits_stored", int),
    ("RescaleType", "rescale_type", str),
]
_SAFE_TEXT = re.compile(r"[^A-Za-z0-9 .,+_()/-]")


def source_facts(ds: Any, *, keep_dates: bool = False) -> dict[str, Any]:
    """Non-identifying technical facts of a header, for ``ingest_study``'s ``source`` record."""
    out: dict[str, Any] = {}
    for keyword, name, cast in _SOURCE_FACTS:
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        if not isinstance(value, (str, bytes, int, float)) and hasattr(value, "__len__"):
            value = value[0] if len(value) else None  # multi-valued (e.g. kernels): the first
            if value is None:
                continue
        try:
            value = cast(value)
        except (TypeError, ValueError):
            continue
        if isinstance(value, str):
            value = _SAFE_TEXT.sub("", value)[:64]
        out[name] = value
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        out["transfer_syntax"] = meta.TransferSyntaxUID.name
    if keep_dates and ds.get("StudyDate"):
        out["study_date"] = str(ds.StudyDate)
    return out
