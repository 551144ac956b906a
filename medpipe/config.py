"""medpipe's one typed configuration.

The same model drives the CLI (``--config FILE``), the flows (a ``config`` parameter) and the
deployments (``deploy/prefect.yaml``). Every field has a default that processes the sample
archive well, so ``Config()`` is a working configuration.

>>> cfg = Config()
>>> cfg.cluster.workers
2
>>> Config.model_validate({"cluster": {"workers": 4}}).cluster.workers
4
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IngestConfig(_Section):
    """Discovery, series selection and DICOM to OME-Zarr conversion."""

    modalities: list[str] = Field(
        default_factory=lambda: ["CT", "MR", "PT", "NM", "CR", "DX", "MG", "XA", "RF", "US", "OT", "SC"],
        description="Image modalities processed; other series are skipped with that reason.",
    )
    min_slices: int = Field(1, ge=1, description="Series with fewer instances (or frames) are skipped.")
    series_description: str | None = Field(
        None, description="Regular expression a series description must match (case-insensitive)."
    )
    orientation: Literal["any", "axial", "coronal", "sagittal"] = "any"
    prefer: Literal["most_slices", "thinnest_slices"] = "most_slices"
    on_inconsistency: Literal["warn", "refuse"] = Field(
        "warn",
        description="Spacing gaps, duplicate positions, tilt, mixed shapes: warn and go on, or fail the study.",
    )
    spacing_tolerance: float = Field(0.05, gt=0, description="Relative tolerance of slice spacing.")
    chunk_mb: float = Field(4.0, ge=1.0, description="Target uncompressed Zarr chunk size in MiB.")
    pyramid_levels: int = Field(3, ge=1, le=8)
    keep_dates: bool = Field(False, description="Keep study dates in outputs (removed by default).")
    keep_descriptions: bool = Field(
        False, description="Keep series descriptions whole; off: only acquisition terms (Annex E removes free text)."
    )
    skip_localizers: bool = Field(True, description="Drop LOCALIZER images from series (with a warning).")
    uid_salt: str = Field("medpipe", description="Salt of the one-way hash that makes study keys.")
    max_series_voxels: int = Field(
        1_000_000_000, ge=1,
        description="Most voxels a series may have (1e9: a 512x512x3000 CT is 7.9e8); a file may claim at most "
                    "this many, a frame at most 1/16 of it. Larger series are skipped, larger files named and skipped.",
    )
    on_nonfinite: Literal["warn", "refuse"] = Field(
        "refuse",
        description="Non-finite or unparseable RescaleSlope/RescaleIntercept, NaN/Inf float voxels: refuse drops the "
                    "file (named issue); warn keeps it with those voxels set to 0 and a warning naming the file.",
    )
    on_duplicate_conflict: Literal["warn", "refuse"] = Field(
        "refuse",
        description="Files sharing a SOPInstanceUID with different pixels: refuse drops them all (named issues); "
                    "warn keeps the first by path and names the kept and dropped files. Identical copies: one kept.",
    )


class FilterStep(_Section):
    """One operator of a filter pipeline, by name with keyword parameters."""

    op: str
    params: dict[str, Any] = Field(default_factory=dict)


def _check_step(kind: str, step: FilterStep, where: str) -> None:
    """``ConfigError`` naming ``where`` when ``step`` names no operator or has bad parameters."""
    from .ops._check import check_step  # lazily: the operators import Dask and SciPy

    try:
        check_step(kind, step.op, step.params, where)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _default_filters() -> dict[str, list[FilterStep]]:
    return {
        "CT": [FilterStep(op="median", params={"size": 3})],
        "MR": [FilterStep(op="gaussian", params={"sigma": 0.7})],
        "default": [],
    }


class FilterConfig(_Section):
    """Per-modality filter pipelines; the key ``default`` serves other modalities."""

    pipelines: dict[str, list[FilterStep]] = Field(default_factory=_default_filters)
    work_chunk_mb: float = Field(
        256.0, ge=1.0, description="Size of the z-slabs operators compute on (halo overhead vs memory)."
    )

    @model_validator(mode="after")
    def _steps_can_run(self) -> "FilterConfig":
        """Unknown operators and bad parameters fail at load (exit 2), not in every study."""
        for modality, steps in self.pipelines.items():
            for i, step in enumerate(steps):
                _check_step("filter", step, f"filters.pipelines.{modality}[{i}]")
        return self

    def for_modality(self, modality: str) -> list[FilterStep]:
        return self.pipelines.get(modality, self.pipelines.get("default", []))


class SegmentConfig(_Section):
    """Per-modality segmentation method and its parameters."""

    methods: dict[str, FilterStep] = Field(
        default_factory=lambda: {
            "CT": FilterStep(op="ct_tissues", params={}),
            "MR": FilterStep(op="brain_tissues", params={}),
            "default": FilterStep(op="otsu", params={}),
        }
    )
    lesion_min_ml: float = Field(0.05, ge=0, description="Smallest component reported as a lesion candidate.")
    lesion_max_ml: float = Field(200.0, gt=0)

    @model_validator(mode="after")
    def _methods_can_run(self) -> "SegmentConfig":
        if "default" not in self.methods:
            raise ConfigError("segment.methods: a 'default' method is required (it serves other modalities)")
        for modality, step in self.methods.items():
            _check_step("segment", step, f"segment.methods.{modality}")
        return self

    def for_modality(self, modality: str) -> FilterStep:
        return self.methods.get(modality, self.methods["default"])


class ModelConfig(_Section):
    """The inference model. ``path=None`` uses the default model that ships with medpipe."""

    path: Path | None = None
    name: str | None = Field(None, description="Overrides the name stored in the model card.")
    version: str | None = None
    input_size: int = Field(128, ge=8, description="Slices are resampled to input_size x input_size.")
    channels: int = Field(1, ge=1)
    window: tuple[float, float] | None = Field(
        None, description="Intensity window (low, high) before normalisation; None uses the model card's."
    )
    output: Literal["slice_classification", "segmentation"] = "slice_classification"
    labels: list[str] = Field(default_factory=lambda: ["no_lesion", "lesion"])
    batch_size: int = Field(32, ge=1)
    batch_across_studies: bool = Field(
        True, description="Fill model batches with slices of every study in flight in the worker process "
        "(one predict call for several small studies); off: each study's batches are predicted alone.",
    )
    batch_wait_ms: float = Field(
        5.0, ge=0, le=1000, description="Longest wait for other studies' slices when a batch is not full "
        "(only while another study in the process is still preparing slices).",
    )
    study_score: Literal["max", "mean_top3"] = Field(
        "max", description="How slice scores become the study score."
    )
    saliency_slices: int = Field(2, ge=0, description="Saliency maps for the N highest-scoring slices.")
    enabled: bool = True
    spacing_mm: float | None = Field(
        None, gt=0, description="In-plane spacing slices are resampled to; None uses the model card's "
        "(no card: the whole slice is resized to input_size).",
    )
    threshold: float | None = Field(
        None, ge=0, le=1, description="Study score at or above which the study label is positive; "
        "None uses the model card's (else 0.5).",
    )
    modalities: list[str] | None = Field(
        None, description="Modalities the model covers (others are skipped); None uses the model card's (else CT)."
    )
    domain: dict[str, Any] | None = Field(
        None, description="What the model applies to (modalities, body_parts, orientation, min_slices, "
        "field_of_view_mm, photometric, series_description, allow_unknown; see medpipe.inference.domain); "
        "its keys override the model card's domain.",
    )

    @model_validator(mode="after")
    def _domain_valid(self) -> "ModelConfig":
        """A bad domain fails at load (exit 2), not in every study."""
        if self.domain is not None:
            from pydantic import ValidationError as _Invalid

            from .inference.domain import Domain  # lazily: the inference package imports this module

            try:
                Domain.model_validate(self.domain)
            except _Invalid as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'domain'}: {e['msg']}" for e in exc.errors())
                raise ConfigError(f"model {self.name or '(unnamed)'}: invalid domain: {problems}") from None
        return self


class ReportConfig(_Section):
    html: bool = True
    dicom_seg: bool = True
    dicom_sr: bool = True
    include_patient_identity: bool = Field(
        False, description="Copy patient identity into SEG/SR (for a PACS). Off: research-safe outputs."
    )


class ClusterConfig(_Section):
    kind: Literal["local", "cuda", "address"] = "local"
    workers: int = Field(2, ge=1, description="Dask worker processes (local cluster).")
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str = Field("auto", description="Per worker, e.g. '4GiB'; 'auto' shares the machine.")
    address: str | None = Field(None, description="tcp://HOST:PORT of an existing Dask scheduler.")
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description="Array device for operators.")
    dashboard: bool = True


class RunConfig(_Section):
    force: bool = Field(False, description="Reprocess studies whose inputs and configuration are unchanged.")
    retries: int = Field(1, ge=0, description="Retries of a study stage after a transient failure.")
    retry_delay_s: float = Field(2.0, ge=0, description="Delay before the first retry; doubles each retry.")
    study_timeout_s: float = Field(3600.0, gt=0)
    keep_intermediates: bool = Field(False, description="Keep filtered.zarr in study folders.")
    max_studies_in_flight: int | None = Field(
        None, ge=0,
        description="Studies processed at a time (each is one task running its stages in turn); it bounds "
                    "staging disk and memory. 0 or empty: two per worker (cluster.workers).")
    allowed_out_roots: list[Path] = Field(
        default_factory=list,
        description="Output folders must lie inside one of these (empty: anywhere). `medpipe serve` "
                    "adds its --out folder, and the MEDPIPE_ALLOWED_OUT_ROOTS of the serving process "
                    "bounds what a run's parameters can ask for (see medpipe.access).")


class ScheduleConfig(_Section):
    cron: str = "0 2 * * *"
    timezone: str = "UTC"


class PacsAuthConfig(_Section):
    """How medpipe authenticates to a DICOMweb server. Only NAMES of secrets live here.

    The values come from environment variables (``*_env``) or from a Prefect Secret block named
    ``secret_block`` (resolved by the task layer; the block holds ``user:password`` for basic
    auth or the token for bearer). run.json holds the whole resolved configuration, so a
    secret itself never belongs in it.
    """

    kind: Literal["none", "basic", "bearer"] = "none"
    username_env: str = Field("MEDPIPE_PACS_USER", description="Environment variable of the basic-auth user.")
    password_env: str = Field("MEDPIPE_PACS_PASSWORD", description="Environment variable of the password.")
    token_env: str = Field("MEDPIPE_PACS_TOKEN", description="Environment variable of the bearer token.")
    secret_block: str | None = Field(None, description="Prefect Secret block name (instead of the variables).")


class PacsConfig(_Section):
    """Talking to a PACS (query/retrieve source and destinations alike)."""

    calling_aet: str = Field("MEDPIPE", min_length=1, max_length=16, description="medpipe's AE title (DIMSE).")
    max_concurrent: int = Field(
        4, ge=1, description="Concurrent HTTP requests / DIMSE associations per PACS address, per process.")
    timeout_s: float = Field(30.0, gt=0, description="Connect/read timeout of one request or DIMSE message.")
    retries: int = Field(3, ge=0, description="Retries after 5xx, timeouts and refused connections/associations.")
    backoff_s: float = Field(1.0, ge=0, description="Delay before the first retry; doubles each retry.")
    auth: PacsAuthConfig = Field(default_factory=PacsAuthConfig)
    ca_bundle: Path | None = Field(None, description="CA bundle (PEM) that signs the server's TLS certificate.")
    retrieve: Literal["get", "move"] = Field(
        "get", description="DIMSE retrieval: C-GET, or C-MOVE to medpipe's own C-STORE receiver.")
    move_aet: str = Field("MEDPIPE", min_length=1, max_length=16,
                          description="AE title of medpipe's C-STORE receiver (known to the PACS as a C-MOVE destination).")
    move_port: int = Field(11113, ge=1, le=65535, description="Port of medpipe's C-STORE receiver (C-MOVE).")


class SourceConfig(_Section):
    """Where studies come from: a folder (the CLI's SOURCE) or a PACS, and the nightly window."""

    # a URL wrongly holding user:password must not be echoed back in the validation error
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    url: str | None = Field(None, description="dicomweb+http(s)://HOST:PORT/PATH or dimse://AET@HOST:PORT; "
                                             "None: the folder given to the CLI.")
    overlap_hours: float = Field(24.0, ge=0, description="The window starts this long before the watermark "
                                                         "(late arrivals are caught).")
    stable_age_s: float = Field(60.0, ge=0, description="A series whose instance count changed more recently "
                                                        "is still growing: its study is deferred.")
    recheck_wait_s: float = Field(
        10.0, ge=0, description="A series seen for the first time (no server stability flag) is counted again "
                                "this long after, while other studies proceed; a change defers the study.")
    max_studies: int | None = Field(None, ge=1, description="Most studies fetched per run (oldest first).")
    use_change_feed: bool = Field(True, description="Also use the server's feed of arrivals (Orthanc /changes).")
    since: date | None = Field(None, description="Window start (overrides the watermark): backfills.")
    until: date | None = Field(None, description="Window end (inclusive day; default now).")
    modalities: list[str] | None = Field(
        None, description="ModalitiesInStudy pushed into the query (None: ingest.modalities).")
    study_description: str | None = Field(None, description="StudyDescription filter pushed into the query "
                                                            "(DICOM wildcards * and ?).")
    cache_dir: Path | None = Field(None, description="Retrieval cache (None: OUT/.work/pacs-cache).")
    cache_max_gb: float = Field(20.0, gt=0, description="Bound of the retrieval cache on a worker.")

    @model_validator(mode="after")
    def _url_is_an_address(self) -> "SourceConfig":
        """A PACS URL is checked at load (scheme, AE title, no credentials in it)."""
        if self.url is not None:
            from .pacs.address import PacsAddress   # here: medpipe.pacs imports this module

            PacsAddress.parse(self.url)
        if self.since and self.until and self.since > self.until:
            raise ValueError(f"source.since {self.since} is after source.until {self.until}")
        return self


class SendConfig(_Section):
    """Results back to PACS destinations (SEG, SR, the report image), through a durable outbox per
    destination under ``OUT/private/outbox/``."""

    destinations: list[str] = Field(
        default_factory=list, description="dicomweb+http(s)://HOST:PORT/PATH or dimse://AET@HOST:PORT of each "
                                          "destination (no credentials in a URL: see pacs.auth).")
    objects: list[Literal["seg", "sr", "report"]] = Field(
        default_factory=lambda: ["seg", "sr", "report"],
        description="What is sent: DICOM SEG, Comprehensive 3D SR, and the report as a Secondary Capture image.")
    identity: Literal["source", "deidentified"] = Field(
        "source", description="source: the sent objects carry the source's patient and study modules and UIDs "
                              "(they file into the source study); deidentified: as the files under OUT "
                              "(report.include_patient_identity governs those).")

    @model_validator(mode="after")
    def _addresses_valid(self) -> "SendConfig":
        """A destination that cannot be parsed (or holds a password) fails at load, not at sending."""
        from .pacs.address import PacsAddress  # lazily: the pacs package imports this module

        for url in self.destinations:
            try:
                PacsAddress.parse(url)
            except ValueError as exc:
                raise ConfigError(f"send.destinations: {exc}") from None
        return self


class Config(_Section):
    # errors name the field and the reason, not the input: a PACS URL wrongly holding
    # user:password (refused by SourceConfig) must not be echoed into a log
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    ingest: IngestConfig = Field(default_factory=IngestConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    segment: SegmentConfig = Field(default_factory=SegmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    models: list[ModelConfig] = Field(
        default_factory=list,
        description="Several models, each with a name and its own domain; every study runs each model whose "
                    "domain it matches. Empty: the one `model`.",
    )
    report: ReportConfig = Field(default_factory=ReportConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    pacs: PacsConfig = Field(default_factory=PacsConfig)
    source: SourceConfig = Field(default_factory=SourceConfig)
    send: SendConfig = Field(default_factory=SendConfig)

    @model_validator(mode="after")
    def _models_named(self) -> "Config":
        """``models`` entries need unique names (they key results); ``model`` is then left unset."""
        if not self.models:
            return self
        if self.model != ModelConfig():
            raise ConfigError("give either `model` (one model) or `models` (several), not both")
        names = [m.name for m in self.models]
        unnamed = [i for i, n in enumerate(names) if not n]
        if unnamed:
            raise ConfigError(f"models[{unnamed[0]}]: every entry of `models` needs a name")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"models: names must be unique; {', '.join(map(str, twice))} given more than once")
        return self

    def inference_models(self) -> list[ModelConfig]:
        """The configured models in order: ``models``, else the one ``model``."""
        return list(self.models) or [self.model]

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> "Config":
        """Read a YAML, JSON or TOML file (or nothing) and apply ``overrides`` on top."""
        data: dict[str, Any] = {}
        if path is not None:
            data = _read_mapping(Path(path))
        if overrides:
            data = deep_merge(data, overrides)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            where = f"{path}: " if path else ""
            raise ConfigError(f"{where}invalid configuration:\n{exc}") from None

    def fingerprint(self) -> str:
        """A hash of everything that changes outputs (cluster and run settings excluded).

        Where studies come from and where results go (``pacs``, ``source``, ``send``: addresses,
        the window, credentials' names) change no output under OUT: a backfill with ``--since``
        must not redo every study it meets again.
        """
        import hashlib

        relevant = self.model_dump(mode="json", exclude={"cluster", "run", "schedule", "pacs", "source", "send"})
        for model in [relevant.get("model"), *(relevant.get("models") or [])]:
            for key in ("batch_across_studies", "batch_wait_ms"):  # how batches are packed: same outputs
                (model or {}).pop(key, None)
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Merge ``top`` into a copy of ``base``, recursing into nested mappings."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: configuration file not found")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except Exception as exc:  # any parser's error becomes one clear message
        raise ConfigError(f"{path}: cannot parse configuration: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: configuration must be a mapping, got {type(data).__name__}")
    return data
