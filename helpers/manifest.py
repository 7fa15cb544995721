"""The data manifest: every data source, encoder checkpoint and output location of the study.

``load(path)`` reads ``data_manifest.yaml``, validates it with pydantic, resolves relative
paths against the manifest's folder and verifies the sha256 of every checkpoint it names.
Every problem is reported as a ``ManifestError`` that names the file, the key and what was
expected.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from helpers.omop import is_url, source_label
from helpers.tasks import DEFAULT_INTERACTION, PROFILES, SHIFTS, TASKS, Setting

__all__ = [
    "ManifestError",
    "ChecksumError",
    "Manifest",
    "SyntheticSource",
    "OmopSource",
    "ImagingSource",
    "EncoderSpec",
    "ENCODER_KINDS",
    "PRETRAINED_KINDS",
    "default_checkpoint",
    "Splits",
    "load",
    "dump",
    "sha256_path",
    "summary",
]

class ManifestError(ValueError):
    """The manifest is missing, malformed, or names something that does not exist."""


class ChecksumError(ManifestError):
    """A file named in the manifest does not have the sha256 the manifest declares."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticSource(_Strict):
    """The built-in digital twin: ``profile`` sets its size, ``seed`` its randomness.

    ``image_share`` (0 to 1) is how much of the true risk the CT carries; the rest is carried
    by the EHR. ``interaction`` (kappa, >= 0) is the weight of the twin's cross-modal
    interaction term (a CT-only factor whose effect grows with an EHR-only one). The profiles
    are ``helpers.tasks.PROFILES``.
    """

    profile: str = "paper"
    seed: Annotated[int, Field(ge=0)] = 20260616
    image_share: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    interaction: Annotated[float, Field(ge=0.0)] = DEFAULT_INTERACTION
    # a setting of the imbalance study (written by the workflow): its outputs go under
    # <profile>/sweep/ (see helpers.tasks.Setting)
    sweep: bool = False
    # a twin of the mechanism study's site shifts (helpers.tasks.SHIFTS): which of the external
    # site's traits it keeps; None (the study's twin) is the external site as it is
    shift: str | None = None

    @field_validator("shift")
    @classmethod
    def _known_shift(cls, value: str | None) -> str | None:
        if value is not None and value not in SHIFTS:
            raise ValueError(f"unknown site shift {value!r}; expected one of {', '.join(SHIFTS)}")
        return value

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        if value not in PROFILES:
            raise ValueError(f"unknown profile {value!r}; expected one of {', '.join(PROFILES)}")
        return value

    @property
    def setting(self) -> Setting:
        """The twin setting (profile, image share, interaction, seed) this source names."""
        return Setting(self.profile, self.image_share, self.interaction, self.seed, sweep=self.sweep,
                       shift=self.shift)


class ImagingSource(_Strict):
    """One task's CT archive: an index table and the folder its ``image_path`` values are in.

    The index (parquet or csv) has one row per study: ``study_id``, ``person_id``,
    ``institution``, ``study_datetime``, ``image_path`` (relative to ``root``) and
    ``image_format`` (``dicom`` for a folder holding one series, or ``nifti``).
    """

    index: Path
    root: Path


class OmopSource(_Strict):
    """A real OMOP CDM v5.4 database (``helpers.omop``): a folder of per-table parquet, CSV or
    TSV files (``.gz`` too), a DuckDB file, or a ``postgresql://`` URL."""

    tables: str | Path
    imaging: dict[str, ImagingSource]

    @field_validator("imaging")
    @classmethod
    def _known_tasks(cls, value: dict[str, ImagingSource]) -> dict[str, ImagingSource]:
        unknown = sorted(set(value) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; expected keys among {sorted(TASKS)}")
        return value


class InspectSource(_Strict):
    """The INSPECT release as downloaded (``helpers.inspect_release``): ``release`` is the
    folder with ``study_mapping_*.tsv``, ``labels_*.tsv``, ``splits_*.tsv`` and ``CTPA/``;
    ``omop`` its EHR as an OMOP CDM source (a folder of tables, a DuckDB file or a
    ``postgresql://`` URL). Task ``pe`` only.

    With ``data.source: inspect`` the study is INSPECT alone, on INSPECT's own splits as given.
    With ``data.source: omop`` (the paper's design) INSPECT is the *external* cohort of task
    ``pe``, next to the internal CT archive ``data.omop.imaging.pe``: the models train on the
    internal source and INSPECT's studies are scored as ``external``; ``splits`` then names
    the INSPECT splits whose studies are used (``train``, ``valid``, ``test``; default all).
    ``pe_positive_only`` (default true): only the CTPAs whose report INSPECT labels as showing a
    PE (``pe_positive_nlp``) enter the cohort, as in the paper ("mortality after PE"); false
    keeps every CTPA of the release."""

    release: Path
    omop: str | Path
    splits: list[Literal["train", "valid", "test"]] | None = None
    pe_positive_only: bool = True


class DataSource(_Strict):
    source: Literal["synthetic", "omop", "inspect"]
    synthetic: SyntheticSource | None = None
    omop: OmopSource | None = None
    inspect: InspectSource | None = None


ENCODER_KINDS = ("builtin", "hf", "medimageinsight", "ct_mae", "clmbr_mini", "clmbr", "table")
# kinds pretrained by the study itself (``python -m helpers pretrain``): their path is optional
PRETRAINED_KINDS = ("ct_mae", "clmbr_mini")


class EncoderSpec(_Strict):
    """A frozen encoder, or an embedding table brought by the user.

    * ``builtin``: needs no checkpoint (``randconv`` image, ``onehot`` EHR).
    * ``ct_mae``, ``clmbr_mini``: the study's own small foundation models. Without ``path``,
      the checkpoint that ``python -m helpers pretrain`` writes under
      ``<outputs>/checkpoints/<task>/<name>`` is used (its sha256 is recorded next to it); with
      ``path`` and ``sha256``, that checkpoint.
    * ``hf`` (a local transformers vision model folder), ``medimageinsight`` (its code and
      weights), ``clmbr`` (CLMBR-T-base through femr; ``python`` is the interpreter of the femr
      environment), ``table`` (a ready embedding table, DESIGN.md format): ``path`` and its
      ``sha256`` (see ``sha256_path``) are required.
    """

    kind: Literal["builtin", "hf", "medimageinsight", "ct_mae", "clmbr_mini", "clmbr", "table"]
    path: Path | None = None
    sha256: str | None = None
    python: Path | None = None
    # pretraining settings of a ct_mae / clmbr_mini model pretrained by the study (fields of
    # CTMAEConfig / ClmbrMiniConfig, e.g. {epochs: 5}); recorded with the checkpoint
    pretrain: dict[str, Any] = Field(default_factory=dict)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is not None and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value)):
            raise ValueError("expected 64 lower-case hexadecimal characters")
        return value


class Encoders(_Strict):
    """Image and EHR encoders by name. Left out, each modality gets the study's built-in ones:
    image ``randconv`` (the first is the one fusion models use) and ``ct_mae`` (pretrained by
    the study); EHR ``onehot`` and ``clmbr`` (kind ``clmbr_mini``)."""

    image: dict[str, EncoderSpec] = Field(
        default_factory=lambda: {"randconv": EncoderSpec(kind="builtin"), "ct_mae": EncoderSpec(kind="ct_mae")})
    ehr: dict[str, EncoderSpec] = Field(
        default_factory=lambda: {"onehot": EncoderSpec(kind="builtin"), "clmbr": EncoderSpec(kind="clmbr_mini")})


class Splits(_Strict):
    """Patient-level splits. ``test_fraction`` is the share of internal *studies* held out as
    the internal test set, per task; ``val_fraction`` the share of the remaining development
    studies used for early stopping; studies from ``external_institutions`` form the
    ``external`` split."""

    seed: int = 0
    test_fraction: dict[str, Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(
        # The paper's internal test share: PE 1,098 / 4,197, MACE 837 / 3,788.
        default_factory=lambda: {"pe": 0.2616, "mace": 0.2210}
    )
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15
    external_institutions: list[str] = Field(default_factory=lambda: ["site_b"])


class Manifest(_Strict):
    """A validated manifest. Paths are absolute once ``load`` has resolved them."""

    version: Literal[1]
    data: DataSource
    encoders: Encoders = Field(default_factory=Encoders)
    splits: Splits = Field(default_factory=Splits)
    output_dir: Path
    path: Path | None = Field(default=None, exclude=True)

    @property
    def run_root(self) -> Path:
        """Where this manifest's outputs go: ``output_dir/<setting label>`` for the twin
        (``<profile>/share-<s>_interaction-<k>_seed-<n>``, so twins of other sizes or settings
        never overwrite each other), ``output_dir/real/<source>`` for real data."""
        return self.output_dir / self.root_label

    @property
    def root_label(self) -> str:
        """``run_root`` relative to ``output_dir`` (the Snakefile's ``{root}`` wildcard)."""
        if self.data.source == "synthetic":
            return self.synthetic.setting.label
        return f"real/{self.data.source}"

    @property
    def synthetic(self) -> SyntheticSource:
        if self.data.synthetic is None:
            raise ManifestError(f"{self.path}: data.synthetic is required when data.source is 'synthetic'")
        return self.data.synthetic

    @property
    def twin_dir(self) -> Path:
        """Folder of the digital twin (only for ``data.source: synthetic``)."""
        return self.run_root / "twin"

    def with_profile(self, profile: str) -> Manifest:
        """A copy whose synthetic profile is ``profile`` (a name of ``helpers.tasks.PROFILES``)."""
        if profile not in PROFILES:
            raise ManifestError(f"profile {profile!r} is not one of {', '.join(PROFILES)}")
        return self.with_setting(Setting(
            profile, self.synthetic.image_share, self.synthetic.interaction, self.synthetic.seed))

    def with_setting(self, setting: Setting) -> Manifest:
        """A copy for the twin at ``setting`` (profile, image share, interaction, seed)."""
        if self.data.source != "synthetic":
            raise ManifestError(
                f"{self.path}: a twin setting applies to the digital twin only, but data.source is "
                f"{self.data.source!r}"
            )
        synthetic = self.synthetic.model_copy(update={
            "profile": setting.profile, "image_share": setting.image_share,
            "interaction": setting.interaction, "seed": setting.seed, "sweep": setting.sweep,
            "shift": setting.shift})
        data = self.data.model_copy(update={"synthetic": synthetic})
        return self.model_copy(update={"data": data})


def default_checkpoint(manifest: Manifest, task: str, name: str) -> Path:
    """Where ``python -m helpers pretrain`` writes the study's own checkpoint of encoder
    ``name`` for ``task``: ``<run_root>/checkpoints/<task>/<name>`` (its sha256 in
    ``<name>.json`` next to it)."""
    return manifest.run_root / "checkpoints" / task / name


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a folder (every file under it, in sorted relative-path order,
    hashed as its relative path followed by its bytes)."""
    digest = hashlib.sha256()
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _format_validation(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid manifest ({err.error_count()} problem(s)):"]
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        kind = problem["type"]
        if kind == "extra_forbidden":
            message = "unknown key (check its spelling)"
        elif kind == "missing":
            message = "required key is missing"
        else:
            message = problem["msg"]
            if "input" in problem and not isinstance(problem["input"], dict):
                message += f" (got {problem['input']!r})"
        lines.append(f"  - {key}: {message}")
    return "\n".join(lines)


def _resolve(base: Path, value: Path) -> Path:
    value = Path(value).expanduser()
    return value if value.is_absolute() else (base / value).resolve()


def _resolved(manifest: Manifest, base: Path, path: Path) -> Manifest:
    data = manifest.data
    if data.source == "synthetic" and data.synthetic is None:
        data = data.model_copy(update={"synthetic": SyntheticSource()})
    if data.source == "inspect" and data.inspect is None:
        raise ManifestError(f"{path}: data.inspect: required when data.source is 'inspect'")
    if data.inspect is not None:
        src = data.inspect
        if data.source == "synthetic":
            raise ManifestError(f"{path}: data.inspect: only with data.source 'inspect' (INSPECT alone) or 'omop' "
                                f"(INSPECT as the external cohort of pe), not with the digital twin")
        if data.source == "inspect" and src.splits is not None:
            raise ManifestError(f"{path}: data.inspect.splits: only when INSPECT is the external cohort (data.source "
                                f"omop); alone, INSPECT's own splits are the study's train, validation and test")
        if data.source == "omop" and data.omop is not None and "pe" not in data.omop.imaging:
            raise ManifestError(f"{path}: data.inspect: INSPECT is the external cohort of task pe, which needs its "
                                f"internal CT archive too; declare data.omop.imaging.pe")
        data = data.model_copy(update={"inspect": src.model_copy(update={
            "release": _resolve(base, src.release),
            "omop": src.omop if is_url(src.omop) else _resolve(base, Path(src.omop))})})
    if data.source == "omop":
        if data.omop is None:
            raise ManifestError(f"{path}: data.omop: required when data.source is 'omop'")
        omop = data.omop
        imaging = {
            task: ImagingSource(index=_resolve(base, src.index), root=_resolve(base, src.root))
            for task, src in omop.imaging.items()
        }
        data = data.model_copy(
            update={"omop": OmopSource(tables=omop.tables if is_url(omop.tables) else _resolve(base, Path(omop.tables)),
                                       imaging=imaging)}
        )
    encoders = {}
    for modality in ("image", "ehr"):
        specs = getattr(manifest.encoders, modality)
        encoders[modality] = {
            name: spec.model_copy(update={key: _resolve(base, getattr(spec, key))
                                          for key in ("path", "python") if getattr(spec, key)})
            for name, spec in specs.items()
        }
    return manifest.model_copy(
        update={
            "data": data,
            "encoders": Encoders(**encoders),
            "output_dir": _resolve(base, manifest.output_dir),
            "path": path,
        }
    )


def _verify(manifest: Manifest) -> None:
    path = manifest.path
    missing: list[str] = []
    if manifest.data.inspect is not None:
        src = manifest.data.inspect
        if not src.release.is_dir():
            missing.append(f"data.inspect.release: {src.release} is not a folder")
        if not is_url(src.omop) and not Path(src.omop).exists():
            missing.append(f"data.inspect.omop: {src.omop} does not exist")
    if manifest.data.source == "omop":
        omop = manifest.data.omop
        assert omop is not None
        if not is_url(omop.tables) and not Path(omop.tables).exists():
            missing.append(f"data.omop.tables: {omop.tables} does not exist")
        for task, src in omop.imaging.items():
            if not src.index.is_file():
                missing.append(f"data.omop.imaging.{task}.index: {src.index} is not a file")
            if not src.root.is_dir():
                missing.append(f"data.omop.imaging.{task}.root: {src.root} is not a folder")
    for modality in ("image", "ehr"):
        for name, spec in getattr(manifest.encoders, modality).items():
            key = f"encoders.{modality}.{name}"
            if spec.pretrain and spec.kind not in PRETRAINED_KINDS:
                missing.append(f"{key}.pretrain: only encoders of kind {' or '.join(PRETRAINED_KINDS)} are pretrained by the study")
            if spec.python is not None and spec.kind != "clmbr":
                missing.append(f"{key}.python: only an encoder of kind 'clmbr' takes an interpreter")
            elif spec.python is not None and not spec.python.is_file():
                missing.append(f"{key}.python: {spec.python} is not a file (the femr environment's python)")
            if spec.kind == "builtin":
                if spec.path is not None:
                    missing.append(f"{key}.path: a builtin encoder takes no path")
                continue
            if spec.path is None:
                if spec.kind in PRETRAINED_KINDS:
                    if spec.sha256 is not None:
                        missing.append(f"{key}.sha256: given without a path (the study's own checkpoint is hashed when it is pretrained)")
                    continue
                missing.append(f"{key}.path: required for an encoder of kind {spec.kind!r}")
            elif not spec.path.exists():
                missing.append(f"{key}.path: {spec.path} does not exist")
            elif spec.sha256 is None:
                missing.append(f"{key}.sha256: required (the checkpoint's sha256: {sha256_path(spec.path)})")
    if missing:
        raise ManifestError(f"{path}: " + "; ".join(missing))
    for modality in ("image", "ehr"):
        for name, spec in getattr(manifest.encoders, modality).items():
            if spec.kind != "builtin" and spec.path is not None and spec.sha256 is not None:
                actual = sha256_path(spec.path)
                if actual != spec.sha256:
                    raise ChecksumError(
                        f"{path}: encoders.{modality}.{name}: checksum mismatch for {spec.path}: "
                        f"manifest says sha256 {spec.sha256}, file has {actual}"
                    )


def load(path: str | Path = "data_manifest.yaml", *, verify: bool = True) -> Manifest:
    """Read, validate and resolve a manifest.

    Relative paths are resolved against the manifest's folder. With ``verify`` (the default),
    paths that must exist are checked and every checkpoint's sha256 is compared with the
    declared one (``ChecksumError`` shows both). Raises ``ManifestError`` naming the file and
    key on any problem.
    """
    given = Path(path).expanduser()
    path = given.resolve()
    if not path.is_file() and not given.is_absolute():
        # notebooks run from notebooks/ or from the project root: try the project root too
        candidate = (Path(__file__).resolve().parent.parent / given).resolve()
        if candidate.is_file():
            path = candidate
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ManifestError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as err:
        raise ManifestError(_format_validation(path, err)) from None
    manifest = _resolved(manifest, path.parent, path)
    if verify:
        _verify(manifest)
    return manifest


def dump(manifest: Manifest, path: Path) -> Path:
    """Write ``manifest`` (with absolute paths) as YAML to ``path``; returns ``path``."""
    payload = manifest.model_dump(mode="json", exclude_none=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(payload, sort_keys=False))
    tmp.replace(path)
    return path


def summary(manifest: Manifest) -> str:
    """A human-readable summary of a loaded manifest."""
    lines = [f"manifest: {manifest.path}"]
    data = manifest.data
    if data.source == "synthetic":
        s = manifest.synthetic
        lines.append(
            f"data: digital twin, profile {s.profile}, seed {s.seed}, image share {s.image_share:g}, "
            f"interaction {s.interaction:g}"
        )
    elif data.source == "inspect":
        assert data.inspect is not None
        lines.append(f"data: INSPECT release {data.inspect.release}, EHR at {source_label(data.inspect.omop)} "
                     f"(task pe, INSPECT's splits)")
    else:
        assert data.omop is not None
        lines.append(f"data: OMOP CDM at {source_label(data.omop.tables)}")
        for task, src in data.omop.imaging.items():
            lines.append(f"  {task}: imaging index {src.index}, root {src.root}")
        if data.inspect is not None:
            lines.append(f"  pe external cohort: INSPECT release {data.inspect.release} ("
                         + (f"splits {', '.join(data.inspect.splits)}" if data.inspect.splits else "every split")
                         + f"), EHR at {source_label(data.inspect.omop)}")
    for modality in ("image", "ehr"):
        for name, spec in getattr(manifest.encoders, modality).items():
            if spec.path and spec.sha256:
                where = f"{spec.path} (sha256 {spec.sha256[:12]}..., verified)"
            elif spec.kind in PRETRAINED_KINDS:
                where = f"pretrained by the study into {manifest.run_root / 'checkpoints' / '<task>' / name}"
            else:
                where = "built in"
            lines.append(f"encoder {modality}/{name}: {spec.kind}, {where}")
    sp = manifest.splits
    fractions = ", ".join(f"{t} {f:.3f}" for t, f in sp.test_fraction.items())
    lines.append(
        f"splits: seed {sp.seed}, internal test share {fractions}, validation share "
        f"{sp.val_fraction:g}, external institutions {', '.join(sp.external_institutions)}"
    )
    lines.append(f"outputs: {manifest.run_root}")
    return "\n".join(lines)
