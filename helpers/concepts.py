"""Concept sets: each phenotype the study reads from the records, as a readable declaration that
works on a real OMOP vocabulary.

A ``ConceptSet`` names standard concepts by ``(vocabulary_id, concept_code)``, never by
``concept_id`` (ids differ between vocabulary releases and the twin's are local):

* conditions: SNOMED CT concepts (``helpers.vocabulary.STANDARD_CONDITIONS``) and all their
  descendants through ``concept_ancestor``, matched against ``condition_concept_id``; and, as
  the fallback for records without a standard mapping, the ICD-10-CM source codes, matched
  against ``condition_source_concept_id`` (and against ``condition_concept_id``, where an
  export that does not follow the CDM put the source concept there);
* drugs: RxNorm ingredients and their descendants (the clinical drugs a real export records);
* labs: LOINC concepts and their descendants; their units are UCUM concepts
  (``unit_concept_id``), with ``unit_source_value`` as the fallback (``helpers.ehr``);
* procedures: CPT4 concepts and their descendants.

Without a ``concept_ancestor`` table only the named concepts themselves are standard members.
``resolve`` writes the resolved sets into a temporary table of the connection; ``report`` counts
how many records each set matched and by which route (``standard``: the record's
``*_concept_id`` is in the set; ``source``: only its source concept is), so that a set matching
nothing is seen, not silently turned into a column of zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import pandas as pd

from helpers.vocabulary import CONCEPTS, LABS, STANDARD_CONDITIONS, concepts_in_group

__all__ = ["ConceptSet", "CONCEPT_SETS", "DOMAINS", "concept_set", "resolve", "report", "matched_sql"]

# domain -> OMOP table, concept column, source concept column
DOMAINS: dict[str, tuple[str, str, str]] = {
    "Condition": ("condition_occurrence", "condition_concept_id", "condition_source_concept_id"),
    "Drug": ("drug_exposure", "drug_concept_id", "drug_source_concept_id"),
    "Measurement": ("measurement", "measurement_concept_id", "measurement_source_concept_id"),
    "Procedure": ("procedure_occurrence", "procedure_concept_id", "procedure_source_concept_id"),
}


@dataclass(frozen=True)
class ConceptSet:
    """One phenotype: its ``name`` (a group of ``helpers.vocabulary``), OMOP ``domain``, the
    ``standard`` concepts whose descendants it includes and the ``source`` codes it falls back
    on, each as ``(vocabulary_id, concept_code)``."""

    name: str
    domain: str
    standard: tuple[tuple[str, str], ...]
    source: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        """One line a reader can check against a vocabulary browser."""
        parts = [", ".join(f"{v} {c}" for v, c in self.standard) + " and descendants"] if self.standard else []
        if self.source:
            parts.append(("else " if self.standard else "") + "source " + ", ".join(f"{v} {c}" for v, c in self.source))
        return "; ".join(parts)


def _sets() -> dict[str, ConceptSet]:
    out = {}
    for group in dict.fromkeys(c.group for c in CONCEPTS):
        members = concepts_in_group(group)
        domain = members[0].domain_id
        if domain == "Condition":
            # a group without a standard concept here (personal history of PE) is found by its
            # source codes only
            standard = tuple(("SNOMED", code) for code, _ in STANDARD_CONDITIONS.get(group, []))
            source = tuple((c.vocabulary_id, c.concept_code) for c in members)
        else:  # RxNorm ingredients, LOINC, CPT4: standard concepts themselves
            standard, source = tuple((c.vocabulary_id, c.concept_code) for c in members), ()
        out[group] = ConceptSet(group, domain, standard, source)
    return out


CONCEPT_SETS: dict[str, ConceptSet] = _sets()


def concept_set(name: str) -> ConceptSet:
    """The concept set ``name``; ``KeyError`` naming the known ones otherwise.

    >>> concept_set("heart_failure").describe()
    'SNOMED 84114007, SNOMED 441481004 and descendants; else source ICD10CM I50.9, ICD10CM I50.22'
    >>> concept_set("anticoagulant").domain, len(concept_set("anticoagulant").standard)
    ('Drug', 4)
    """
    if name not in CONCEPT_SETS:
        raise KeyError(f"no concept set {name!r}; known: {', '.join(CONCEPT_SETS)}")
    return CONCEPT_SETS[name]


def _tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    return {row[0] for row in con.execute(f"DESCRIBE {table}").fetchall()}


def resolve(con: duckdb.DuckDBPyConnection, names: list[str] | tuple[str, ...]) -> str:
    """Resolve the concept sets ``names`` on ``con``'s vocabulary into the temporary table
    ``_concept_sets(grp, concept_id, route)`` (``route``: ``standard`` for the named standard
    concepts and their descendants, ``source`` for the source codes); returns its name."""
    sets = [concept_set(n) for n in dict.fromkeys(names)]
    rows = [(s.name, "standard", v, c) for s in sets for v, c in s.standard]
    rows += [(s.name, "source", v, c) for s in sets for v, c in s.source]
    frame = pd.DataFrame(rows, columns=["grp", "route", "vocabulary_id", "concept_code"])
    con.register("_declared", frame)
    descend = "concept_ancestor" in _tables(con)
    ancestors = ("""
        UNION
        SELECT n.grp, ca.descendant_concept_id AS concept_id, 'standard' AS route
        FROM named n JOIN concept_ancestor ca ON ca.ancestor_concept_id = n.concept_id
        WHERE n.route = 'standard'""" if descend else "")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _concept_sets AS
        WITH named AS (
            SELECT d.grp, d.route, c.concept_id FROM _declared d
            JOIN concept c ON c.vocabulary_id = d.vocabulary_id AND c.concept_code = d.concept_code)
        SELECT grp, concept_id, route FROM named{ancestors}
    """)
    con.unregister("_declared")
    return "_concept_sets"


def matched_sql(con: duckdb.DuckDBPyConnection, domain: str, alias: str = "t") -> str:
    """SQL of the records of ``domain``'s table matched by the resolved sets (``resolve``):
    every column of the record (as ``alias``) and ``grp`` (the set), ``route``; a record in
    a set by both routes appears once, as ``standard``."""
    table, concept_col, source_col = DOMAINS[domain]
    columns = _columns(con, table)
    parts = [f"""SELECT {alias}.*, cs.grp, 'standard' AS route FROM {table} {alias}
                 JOIN _concept_sets cs ON cs.route = 'standard' AND cs.concept_id = {alias}.{concept_col}"""]
    not_standard = (f"NOT EXISTS (SELECT 1 FROM _concept_sets x WHERE x.route = 'standard' AND x.grp = cs.grp "
                    f"AND x.concept_id = {alias}.{concept_col})")
    keys = [concept_col] + ([source_col] if source_col in columns else [])
    for key in keys:  # one equi-join per column (an OR of both would not hash)
        parts.append(f"""SELECT {alias}.*, cs.grp, 'source' AS route FROM {table} {alias}
                         JOIN _concept_sets cs ON cs.route = 'source' AND cs.concept_id = {alias}.{key}
                         WHERE {not_standard}""")
    # a record matched through both its concept and its source concept appears once
    return "SELECT DISTINCT * FROM (" + " UNION ALL ".join(parts) + ")"


def report(con: duckdb.DuckDBPyConnection, names: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """Per concept set of ``names``: its domain, the standard concepts it resolved to, the
    records it matched by route (whole source, any date) and ``matched`` (False: a set that
    matches nothing, whose features would be all zero)."""
    resolve(con, names)
    counts = {}
    for domain in DOMAINS:
        members = [n for n in dict.fromkeys(names) if concept_set(n).domain == domain]
        if not members:
            continue
        frame = con.execute(f"""
            SELECT grp, route, count(*) AS records FROM ({matched_sql(con, domain)})
            WHERE grp IN ({', '.join(f"'{m}'" for m in members)}) GROUP BY grp, route""").df()
        for row in frame.itertuples(index=False):
            counts[(row.grp, row.route)] = int(row.records)
    resolved = con.execute("SELECT grp, route, count(DISTINCT concept_id) AS n FROM _concept_sets "
                           "GROUP BY grp, route").df()
    n_concepts = {(r.grp, r.route): int(r.n) for r in resolved.itertuples(index=False)}
    rows = []
    for name in dict.fromkeys(names):
        s = concept_set(name)
        standard, source = counts.get((name, "standard"), 0), counts.get((name, "source"), 0)
        rows.append({"concept_set": name, "domain": s.domain, "definition": s.describe(),
                     "standard_concepts": n_concepts.get((name, "standard"), 0),
                     "records_standard": standard, "records_source": source,
                     "records": standard + source, "matched": standard + source > 0})
    return pd.DataFrame(rows)


assert set(LABS) <= set(CONCEPT_SETS), "every lab has a concept set"
