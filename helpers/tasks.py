"""The study's public names, declared once: tasks, fusion strategies, EHR representations,
twin profiles and the settings of the twin that a study can be run at.

Everything that lists a task, a strategy, a representation or a profile (the notebooks, the
Snakefile, training, the comparison, the command line, the twin) reads it from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "Task",
    "TASKS",
    "Strategy",
    "STRATEGIES",
    "FUSIONS",
    "TOKEN_FUSIONS",
    "MULTIMODAL",
    "EhrRepresentation",
    "EHR_REPRESENTATIONS",
    "EHR_REPRS",
    "UNIMODAL_IMAGE",
    "Profile",
    "PROFILES",
    "Setting",
    "DEFAULT_INTERACTION",
    "SHIFTS",
    "ParameterError",
    "check_choice",
    "get_task",
    "get_strategy",
    "get_profile",
    "grid_runs",
]


class ParameterError(ValueError):
    """A notebook or command parameter has a value outside its allowed set."""


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """A time-to-event task.

    ``horizon_days`` is the follow-up at which survival probabilities are reported and at which
    follow-up is administratively censored; ``window_hu`` is the CT intensity window (HU) from
    the paper; ``outcome_groups`` are the vocabulary groups (see ``helpers.vocabulary``) whose
    first occurrence after the index CT is the event, besides death where ``death_is_event``.
    """

    name: str
    title: str
    horizon_days: int
    window_hu: tuple[float, float]
    index_procedure_group: str
    outcome_groups: tuple[str, ...]
    death_is_event: bool


TASKS: dict[str, Task] = {
    "pe": Task(
        name="pe",
        title="Mortality after pulmonary embolism",
        horizon_days=365,
        window_hu=(-1350.0, 150.0),
        index_procedure_group="ctpa",
        outcome_groups=(),
        death_is_event=True,
    ),
    "mace": Task(
        name="mace",
        title="Major adverse cardiac events",
        # The paper does not state the MACE follow-up; 5 years is the horizon of the
        # PREVENT-style risk scores it cites.
        horizon_days=1825,
        window_hu=(-125.0, 225.0),
        index_procedure_group="ct_chest",
        outcome_groups=("mi", "stroke", "heart_failure"),
        # Any death counts: the twin, like most OMOP extracts, records no cause of death
        # reliably enough to separate cardiac from other deaths.
        death_is_event=True,
    ),
}


# ----------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class Strategy:
    """A fusion strategy: its parameter value ``name``, its row ``label`` in Table 1, the
    modalities it uses (``image``, ``ehr``) and whether it attends over token sequences."""

    name: str
    label: str
    modalities: tuple[str, ...]
    tokens: bool
    summary: str

    @property
    def uses_image(self) -> bool:
        return "image" in self.modalities

    @property
    def uses_ehr(self) -> bool:
        return "ehr" in self.modalities

    @property
    def unimodal(self) -> bool:
        return len(self.modalities) == 1


# In the order of the paper's Table 1.
STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("image_only", "Image only", ("image",), False,
             "survival head on the image embedding (the unimodal reference)"),
    Strategy("ehr_only", "EHR only", ("ehr",), False, "survival head on the EHR embedding"),
    Strategy("concat", "Concatenation", ("image", "ehr"), False,
             "concatenation of the two embeddings (the cross-modal reference)"),
    Strategy("contrastive", "Contrastive learning", ("image", "ehr"), False,
             "CLIP-style InfoNCE alignment of projected embeddings, then a survival head"),
    Strategy("cross_attention", "Cross-attention", ("image", "ehr"), True,
             "bidirectional cross-attention; fused = concat(h_ehr, A_ehr<-img, h_img, A_img<-ehr)"),
    Strategy("coattn_image_guided", "Co-attention (image guide)", ("image", "ehr"), True,
             "image queries attend over EHR tokens; fused = concat(h_ehr, A)"),
    Strategy("coattn_ehr_guided", "Co-attention (EHR guide)", ("image", "ehr"), True,
             "EHR queries attend over image tokens; fused = concat(h_img, A)"),
)}
FUSIONS: tuple[str, ...] = tuple(STRATEGIES)
TOKEN_FUSIONS: tuple[str, ...] = tuple(s.name for s in STRATEGIES.values() if s.tokens)
MULTIMODAL: tuple[str, ...] = tuple(s.name for s in STRATEGIES.values() if not s.unimodal)


# ----------------------------------------------------------------------------- EHR representations


@dataclass(frozen=True)
class EhrRepresentation:
    """An EHR representation (``ehr_repr``): its name (an entry of the manifest's
    ``encoders.ehr``), its label in Table 1 and how attention strategies cut it into tokens
    (``feature``: one token per curated feature; ``chunk``: equal chunks of the vector)."""

    name: str
    label: str
    ehr_tokens: str


EHR_REPRESENTATIONS: dict[str, EhrRepresentation] = {r.name: r for r in (
    EhrRepresentation("onehot", "one-hot", "feature"),
    EhrRepresentation("clmbr", "CLMBR", "chunk"),
)}
EHR_REPRS: tuple[str, ...] = tuple(EHR_REPRESENTATIONS)
# image_only uses no EHR representation; its runs live under this ehr_repr name.
UNIMODAL_IMAGE = "none"


# ----------------------------------------------------------------------------- twin profiles and settings

# The twin's default cross-modal interaction (kappa, see helpers.twin).
DEFAULT_INTERACTION = 0.75

# The external site's shifts (``helpers.twin.records.SITE_SHIFTS`` says which traits each
# one takes over): ``none`` (its patients, recorded and scanned as at the internal site), one
# trait group at a time, and ``all`` (the external site as it is, the default).
SHIFTS: tuple[str, ...] = ("none", "hu_offset", "noise", "slice_thickness", "ehr_completeness", "lab_units", "all")


@dataclass(frozen=True)
class Profile:
    """A size of the digital twin and the grid run on it.

    ``sizes``: CT studies per task and institution (``internal``, ``external``).
    ``min_event_rate``: a floor on every institution's event fraction within the horizon (a
    teaching twin raises the paper's rates so that small test cohorts hold enough events;
    ``None`` keeps the paper's rates). ``seeds``: training seeds of the grid.
    The mechanism study (``helpers.mechanism``, the chapter *Fusion under modality imbalance*):
    every strategy on the one-hot EHR features at each ``image_share`` of ``mechanism_shares``
    and each interaction of ``mechanism_interactions`` (multiples of the manifest's kappa), on
    ``mechanism_twin_seeds`` twins of size ``mechanism_profile`` (the manifest's seed and the
    next ones; 0 for no mechanism study), and the tuning setting's models on the external site
    under each site shift of ``mechanism_shifts`` (``SHIFTS``), on twins with
    ``mechanism_shift_studies`` external studies, at the first ``mechanism_shift_seeds`` twin
    seeds. ``short_pretraining``: the built-in foundation models pretrain
    for a fraction of their default steps (``helpers.pretrain.QUICK_PRETRAIN``).
    ``probe_encoders``: also extract (and pretrain) the manifest's other image encoders, which
    the embeddings chapter probes but no model trains on (the fusion models use the first); the
    workflow's ``--config probe_encoders=1`` turns it on for any profile. At paper size it
    costs about 15 minutes of CPU for ``ct_mae`` (pretraining and extraction of both tasks), so
    only the tests' twin probes by default.
    ``saliency_fusions``: the fusions whose saliency the study compares with image-only
    (``notebooks/05_saliency.ipynb``, for the grid's first EHR representation and seed), on
    ``saliency_cases`` cases per task with ``saliency_method``.
    """

    name: str
    summary: str
    sizes: dict[str, dict[str, int]]
    min_event_rate: float | None
    seeds: tuple[int, ...]
    mechanism_profile: str = "mechanism"
    mechanism_twin_seeds: int = 0
    mechanism_shares: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    mechanism_interactions: tuple[float, ...] = (0.0, 1.0, 2.0)
    mechanism_shifts: tuple[str, ...] = SHIFTS
    mechanism_shift_studies: int = 400
    mechanism_shift_seeds: int = 1
    short_pretraining: bool = False
    probe_encoders: bool = True
    saliency_fusions: tuple[str, ...] = ("concat", "contrastive", "cross_attention", "coattn_image_guided",
                                         "coattn_ehr_guided")
    saliency_cases: int = 16
    saliency_method: str = "smoothgrad"


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("tiny", "a few dozen studies per task: the tests' twin",
            {"pe": {"internal": 140, "external": 40}, "mace": {"internal": 140, "external": 40}},
            min_event_rate=0.3, seeds=(0,), mechanism_profile="tiny", mechanism_twin_seeds=1,
            mechanism_shares=(0.0, 1.0), mechanism_interactions=(0.0, 1.0), mechanism_shifts=("none", "noise", "lab_units"),
            mechanism_shift_studies=30, short_pretraining=True, saliency_cases=6),
    Profile("quick", "a few hundred studies per task, teaching event rates: a workshop's coffee break",
            {"pe": {"internal": 450, "external": 120}, "mace": {"internal": 440, "external": 120}},
            min_event_rate=0.4, seeds=(0,), short_pretraining=True,
            probe_encoders=False, saliency_fusions=("cross_attention",)),
    Profile("paper", "the paper's cohort sizes and event rates, three training seeds",
            {"pe": {"internal": 4197, "external": 435}, "mace": {"internal": 3788, "external": 682}},
            min_event_rate=None, seeds=(0, 1, 2), mechanism_twin_seeds=3, probe_encoders=False),
    Profile("mechanism", "the mechanism study's twin: internal test cohorts of 200 events or more, "
            "event rates raised to 60%",
            {"pe": {"internal": 1500, "external": 100}, "mace": {"internal": 1700, "external": 100}},
            min_event_rate=0.6, seeds=(0,)),
)}


def _num(value: float) -> str:
    return f"{round(float(value), 4):g}"


@dataclass(frozen=True)
class Setting:
    """A setting of the digital twin: its profile, ``image_share`` (the CT's share of the
    non-interaction log-hazard), ``interaction`` (kappa) and seed. ``label`` names its
    folder under the output directory, ``<profile>/share-<s>_interaction-<k>_seed-<n>``; a
    setting of the mechanism study (``sweep``, ``helpers.mechanism``) lives apart, under
    ``<profile>/sweep/``, so that a folder's grid never depends on which study asked for it.

    >>> Setting("quick", 0.5, 0.35, 7).label
    'quick/share-0.5_interaction-0.35_seed-7'
    >>> Setting("quick", 1.0, 0.35, 7, sweep=True).label
    'quick/sweep/share-1_interaction-0.35_seed-7'
    >>> Setting.from_label("quick/sweep/share-1_interaction-0.35_seed-7") == Setting("quick", 1.0, 0.35, 7, sweep=True)
    True

    ``shift`` (None, the study's twin; or one of ``SHIFTS``, a twin of the mechanism study's
    site shifts, whose external site keeps only the named traits and whose label names it):

    >>> Setting("quick", 0.5, 0.75, 7, sweep=True, shift="hu_offset").label
    'quick/sweep/share-0.5_interaction-0.75_seed-7_shift-hu-offset'
    >>> Setting.from_label(_).shift
    'hu_offset'
    """

    profile: str
    image_share: float
    interaction: float
    seed: int
    sweep: bool = False
    shift: str | None = None

    def __post_init__(self) -> None:
        check_choice("profile", self.profile, tuple(PROFILES))
        if not (math.isfinite(self.image_share) and 0.0 <= self.image_share <= 1.0):
            raise ParameterError(f"parameter 'image_share': expected a number in [0, 1], got {self.image_share!r}")
        if not (math.isfinite(self.interaction) and self.interaction >= 0.0):
            raise ParameterError(f"parameter 'interaction': expected a number >= 0, got {self.interaction!r}")
        if isinstance(self.seed, bool) or int(self.seed) != self.seed or self.seed < 0:
            raise ParameterError(f"parameter 'seed': expected an integer >= 0, got {self.seed!r}")
        if self.shift is not None:
            check_choice("shift", self.shift, SHIFTS)

    @property
    def label(self) -> str:
        return (f"{self.profile}/{'sweep/' if self.sweep else ''}share-{_num(self.image_share)}"
                f"_interaction-{_num(self.interaction)}_seed-{int(self.seed)}"
                + ("" if self.shift is None else f"_shift-{self.shift.replace('_', '-')}"))

    @classmethod
    def from_label(cls, label: str) -> Setting:
        """The setting a folder label names (see ``label``); ``ParameterError`` otherwise."""
        try:
            folders = label.split("/")
            if len(folders) == 3 and folders[1] != "sweep":
                raise ValueError(label)
            profile, rest = folders[0], folders[-1]
            parts = dict(part.split("-", 1) for part in rest.split("_"))
            if set(parts) - {"share", "interaction", "seed", "shift"}:
                raise ValueError(label)
            return cls(profile, float(parts["share"]), float(parts["interaction"]), int(parts["seed"]),
                       sweep=len(folders) == 3,
                       shift=parts["shift"].replace("-", "_") if "shift" in parts else None)
        except (ValueError, KeyError):
            raise ParameterError(f"{label!r} is not a twin setting label; expected "
                                 f"<profile>[/sweep]/share-<s>_interaction-<k>_seed-<n>[_shift-<shift>]") from None


# ----------------------------------------------------------------------------- lookups


def check_choice(name: str, value: object, allowed: tuple[str, ...] | list[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise ``ParameterError`` naming it.

    >>> check_choice("task", "pe", tuple(TASKS))
    'pe'
    >>> check_choice("fusion", "late", FUSIONS)
    Traceback (most recent call last):
    ...
    helpers.tasks.ParameterError: parameter 'fusion': unknown value 'late'; expected one of image_only, ehr_only, concat, contrastive, cross_attention, coattn_image_guided, coattn_ehr_guided
    """
    if value not in allowed:
        raise ParameterError(
            f"parameter {name!r}: unknown value {value!r}; expected one of {', '.join(map(str, allowed))}"
        )
    return str(value)


def get_task(name: str) -> Task:
    """The ``Task`` called ``name`` (``pe`` or ``mace``), or ``ParameterError``."""
    return TASKS[check_choice("task", name, tuple(TASKS))]


def get_strategy(name: str) -> Strategy:
    """The ``Strategy`` called ``name``, or ``ParameterError``."""
    return STRATEGIES[check_choice("fusion", name, FUSIONS)]


def get_profile(name: str) -> Profile:
    """The ``Profile`` called ``name``, or ``ParameterError``."""
    return PROFILES[check_choice("profile", name, tuple(PROFILES))]


def grid_runs(ehr_reprs: tuple[str, ...] = EHR_REPRS, fusions: tuple[str, ...] = FUSIONS,
              seeds: tuple[int, ...] = (0,)) -> list[tuple[str, str, int]]:
    """The (ehr_repr, fusion, seed) runs of a grid: a strategy that uses no EHR runs once
    under ``UNIMODAL_IMAGE``, every other once per EHR representation.

    >>> grid_runs(("onehot", "clmbr"), ("image_only", "concat"))
    [('none', 'image_only', 0), ('onehot', 'concat', 0), ('clmbr', 'concat', 0)]
    """
    runs = []
    for fusion in fusions:
        reprs = (UNIMODAL_IMAGE,) if not get_strategy(fusion).uses_ehr else ehr_reprs
        runs += [(r, fusion, s) for r in reprs for s in seeds]
    return runs
