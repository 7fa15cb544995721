"""The digital twin: synthetic OMOP CDM records, CT volumes and their hidden ground truth.

``generate(out_dir)`` writes, for each task (``pe``, ``mace``), two institutions: ``internal``
(``site_a``, NIfTI volumes) and ``external`` (``site_b``, DICOM series), laid out as::

    <out_dir>/<task>/omop/<table>.parquet          OMOP CDM v5.4 tables (and ``concept``)
    <out_dir>/<task>/imaging_index.parquet         one row per CT study
    <out_dir>/<task>/images/site_a/<study_id>.nii.gz
    <out_dir>/<task>/images/site_b/<study_id>/<nnnn>.dcm
    <out_dir>/<task>/ground_truth/factors.parquet  latent factors and the true log-hazard
    <out_dir>/<task>/ground_truth/lesions.parquet  embolus / calcification voxel counts
    <out_dir>/<task>/ground_truth/masks/<study_id>.npz   uint8 mask: 1 embolus, 2 calcium;
                                                   and anatomy: 1 heart, 2 pulmonary arteries
    <out_dir>/<task>/twin.json                     parameters, counts, event rates, timing

The sizes come from ``helpers.tasks.PROFILES`` (``tiny``, ``quick``, ``paper``); see
``generate`` for its parameters.

How it works. Each patient has latent factors (a Gaussian copula): age, sex, coronary
calcium, cardiac dysfunction, cancer, renal dysfunction, chronic lung disease, frailty,
diabetes, hypertension, smoking, pulmonary-artery dilation and, per CT study, clot burden and
right-ventricular strain. ``VISIBILITY`` says which modality shows each, and so which group
(``GROUPS``) it belongs to: CT-exclusive (clot burden, coronary calcium), EHR-exclusive
(cancer, renal and lung disease, frailty, diabetes, hypertension, smoking, age, sex) or shared
(cardiac dysfunction, PA dilation, RV strain). Factors correlate only within their group, so a
factor one modality cannot show leaves no trace there. Continuous factors are unitless
severities, standard normal in the internal population (higher = worse); binary factors are
0/1; age is in years. The true log-hazard is

    beta * (sqrt(s) * ct_part + sqrt(1 - s) * ehr_part + gamma * shared_part + kappa * interaction_part)

(before ``beta``; ``ground_truth/factors.parquet`` stores each part with ``beta`` and its weight
applied, so that they sum to ``true_log_hazard``), where ``s`` is ``image_share``, ``gamma`` is
``SHARED_WEIGHT`` (0.5) and ``kappa`` is ``interaction`` (default
``helpers.tasks.DEFAULT_INTERACTION``). Each part is standardised on a reference sample of the
internal population and built from its group's factors, with non-linear terms; the
interaction multiplies a CT-exclusive factor by a continuous EHR-exclusive one (``INTERACTIONS``;
pe: the positive parts of clot burden and frailty, a large clot in a frail patient; mace:
coronary calcium times renal dysfunction), centred so that it is orthogonal to every
single-factor term. ``information_balance`` measures what each group explains. Event
times follow a Weibull proportional-hazards model whose baseline is calibrated per
institution (deterministic bisection) to a target event fraction within the horizon: the
paper's rate (PE 7 % internal, 19 % external; MACE 46 % and 28 %), raised to the profile's
``min_event_rate`` where it sets one (the teaching profiles ``tiny`` and ``quick`` raise every
rate to at least 30 %, so that small cohorts hold enough events; ``paper`` keeps the paper's
rates). ``twin.json`` records the targets used. A patient's event time is drawn once, from
the log-hazard of the first study; a later PE study shows a new clot burden but the same
outcome, so in ``ground_truth/factors.parquet`` every study's ``true_log_hazard`` (and its
parts ``ct_part``, ``ehr_part``, ``shared_part``, ``interaction_part``) is that of the
patient's first study, the one that generated the outcome, while ``scan_log_hazard`` is the
log-hazard of the study's own factors (equal to ``true_log_hazard`` for first studies and
for mace). Outcomes are never labelled: deaths are ``death`` rows, MACE events are post-index
condition codes, censoring is the end of the observation period.

The CT volumes are phantoms at 64 x 64 pixels of 5.5-6 mm: body, lungs, heart and
ventricles, aorta, spine and the pulmonary arteries (trunk, main branches, three lobar
arteries per side), contrast-enhanced for PE. Each factor the CT shows has a visible
correlate: emboli are filling defects (clot at 25-65 HU in a 320 HU lumen) whose number of
affected lobar arteries, length and share of the lumen grow with the clot burden, with
central clots above the median and a saddle embolus across the bifurcation above about +1
sd; calcified plaques on the heart's surface grow in number and size with coronary calcium;
the RV, the pulmonary arteries and the heart widen with RV strain, PA dilation and cardiac
dysfunction. The masks mark exactly the voxels rendered as embolus or calcium.

The external site differs from the internal one in its patients (``factors._SPECS``: older,
sicker) and in its site: a scanner with a 20 HU offset, twice the noise and 3 mm slices, and
sparser records (shorter history, fewer visits, lower coding sensitivity, fewer labs) with
labs in other units. ``SITE_SHIFTS`` names these traits in groups, and ``generate(...,
site_shift=...)`` gives the external site one group only (or ``none``), the patients and
outcomes unchanged: the mechanism study's shift settings.

A few studies (about 0.5 %) carry planted defects a cohort builder must exclude: zero
follow-up after the index, or a death recorded before the index CT. They are listed in
``ground_truth/factors.parquet`` (column ``defect``) and counted in ``twin.json``.

Nothing outside ``ground_truth/`` holds a factor directly; ``helpers.truth`` is the one
reader of it (for the twin chapter, the oracle, the probes and saliency checks). Results
depend only on ``seed`` (and the other parameters), not on the number of worker processes.

The package's modules, each importing only those above it::

    factors    latent factors, their copula, ``VISIBILITY`` and ``GROUPS``, the log-hazard
               and its parts, the standardiser, ``factor_effects``, ``information_balance``
    outcomes   each institution's cohort: studies per patient, event times calibrated to the
               target rates, censoring, later studies, planted defects, the outcomes as
               recorded and the oracle C-index
    records    institutions, record keeping, the OMOP CDM rows and tables
    phantom    the CT phantoms, emboli, calcium, masks, writing the volumes
    build      ``generate``: sizes, image jobs and their process pool, ``twin.json``
"""

from __future__ import annotations

from helpers.twin.build import GENERATOR_VERSION, generate
from helpers.twin.factors import (
    FACTOR_COLUMNS,
    GROUPS,
    PARTS,
    VISIBILITY,
    factor_effects,
    information_balance,
)
from helpers.twin.records import INSTITUTIONS, OMOP_TABLE_NAMES, SITE_SHIFTS

__all__ = [
    "GENERATOR_VERSION",
    "INSTITUTIONS",
    "FACTOR_COLUMNS",
    "GROUPS",
    "PARTS",
    "VISIBILITY",
    "OMOP_TABLE_NAMES",
    "SITE_SHIFTS",
    "factor_effects",
    "generate",
    "information_balance",
]
