"""Results as data: one JSON record per reproduction, verdicts computed by a stated rule.

Each reproduction has a record, ``experiments/results/NAME.json`` (the claim, the published
numbers and their source, our values per seed, the comparisons to test), and a section of text,
``experiments/results/NAME.md`` (the protocol in full and the discussion).
``python -m experiments.results`` renders ``experiments/RESULTS.md`` from
``experiments/results/header.md``, the records and the sections; ``--check`` exits 1 when the
committed file differs from what it would write. A verdict is never stored: :func:`verdict`
computes it from the numbers each time.

The rule
--------
A comparison expects arm ``a`` to be less than, greater than or equal to ``b``: another arm, or
a published number.

* ``"welch"`` (two arms with a random seed): Welch's two-sided t-test
  (``scipy.stats.ttest_ind(a, b, equal_var=False)``) over at least 3 seeds per arm. With
  p < 0.05 the claim "holds" when the means differ in the expected direction and "does not hold"
  otherwise.
* ``"2se"`` (an arm with a random seed against a fixed number: a published value, or an arm with
  no random seed such as PCA): the difference between our mean and that number must exceed
  2 standard errors of our mean (sample standard deviation / sqrt(n), n >= 3 seeds); then holds
  or does not hold as above.
* Otherwise the verdict is "inconclusive", in particular with fewer than 3 seeds in an arm. An
  expected equality can be refuted (a significant difference: "does not hold"), never confirmed.

Schema of a record (``?``: optional)
-----------------------------------
::

    {
      "name": "denoising",          # the file's stem
      "number": 4,                  # its place in RESULTS.md (unique)
      "title": "Denoising",         # the section heading
      "label": "denoising",         # ? the summary table's experiment column (default: title)
      "claim": "...",               # the claim, in words
      "source": "...",              # the paper (and table or figure) of the claim and numbers
      "published": {                # published numbers, keyed by a readable name ({} if none)
        "KEY": {"value": 3.33, "dataset"?: "MNIST", "source"?: "...", "decimals"?: 2}
      },
      "metric": "...",              # what the arms' values measure (an arm may override it)
      "decimals": 2,                # ? digits shown (default 2; arms and published entries may
                                    #   override it)
      "arms": {                     # our numbers, keyed by a readable name; one of three forms:
        "ARM": {"values": [9.78], "seeds": [0]},                 # a value per random seed
        "ARM": {"mean": 34.36, "std": 1.89, "seeds": [0, 1, 2]}, # only mean and sample std kept
        "ARM": {"value": 11.87}                                  # no random seed (PCA, bicubic)
        # each form: ? "metric", ? "decimals", ? "note"
      },
      "comparisons": [              # may be [] (figures only)
        {"claim": "...", "a": "ARM", "b": "ARM" (or "published": "KEY"),
         "expect": "less" | "greater" | "equal", "rule": "welch" | "2se"}
      ],
      "protocol": "...",            # what was run, and what differs from the paper
      "cost": {"wall_seconds": 253 | [253, 314] | null, "cpu": "..."},
      "command": "python -m ..." | ["...", "..."],
      "section": "denoising.md"     # ? the section's text (default: NAME.md)
    }

"welch" needs two arms of the first two forms; "2se" an arm of the first two forms against an
arm of the third form or a published number.

The scripts add their numbers with :func:`record` (or :func:`record_many`): a value per arm and
seed replaces the one of the same seed, so running a script with three seeds gives an arm three
values. Arms and comparisons are declared in the record by hand; :func:`record` refuses an arm
the record does not declare.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
HEADER = "header.md"

ALPHA = 0.05
MIN_SEEDS = 3
EXPECTS = ("less", "greater", "equal")
RULES = ("welch", "2se")
RULE_NAMES = {"welch": "Welch's t-test", "2se": "2 SE"}

_REQUIRED = ("name", "number", "title", "claim", "source", "published", "metric", "arms",
             "comparisons", "protocol", "cost", "command")
_OPTIONAL = ("label", "decimals", "section")
_ARM_EXTRAS = ("metric", "decimals", "note")


# --------------------------------------------------------------------------- loading, validation


def _fail(path: str, field: str, problem: str):
    raise ValueError(f"{path}: {field}: {problem}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _text(record: Mapping, key: str, path: str, field: str | None = None) -> None:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        _fail(path, field or key, "must be a non-empty string")


def _decimals(entry: Mapping, path: str, field: str) -> None:
    if "decimals" in entry and (not isinstance(entry["decimals"], int)
                                or isinstance(entry["decimals"], bool)
                                or not 0 <= entry["decimals"] <= 6):
        _fail(path, f"{field}.decimals", "must be an integer from 0 to 6")


def _seeds(seeds, path: str, field: str) -> None:
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        _fail(path, field, "must be a non-empty list of non-negative integers")
    if len(set(seeds)) != len(seeds):
        _fail(path, field, f"repeats a seed: {seeds}")


def arm_kind(arm: Mapping) -> str:
    """``"values"``, ``"summary"`` (mean and std only) or ``"fixed"`` (no random seed)."""
    return "values" if "values" in arm else "summary" if "mean" in arm else "fixed"


def _validate_arm(arm, path: str, field: str) -> None:
    if not isinstance(arm, dict):
        _fail(path, field, "must be an object")
    forms = [k for k in ("values", "mean", "value") if k in arm]
    if len(forms) != 1:
        _fail(path, field, "needs exactly one of 'values' (the measured number of each run, "
                           "beside the list of the runs' random seeds), 'mean' (with 'std' and "
                           "that list) or 'value' (a measurement without randomness)")
    kind = arm_kind(arm)
    allowed = {"values": ("values", "seeds"), "summary": ("mean", "std", "seeds"),
               "fixed": ("value",)}[kind] + _ARM_EXTRAS
    for key in arm:
        if key not in allowed:
            _fail(path, f"{field}.{key}", f"unknown field for an arm of this form ({kind})")
    if kind == "values":
        values = arm["values"]
        if not isinstance(values, list) or not values or not all(map(_is_number, values)):
            _fail(path, f"{field}.values", "must be a non-empty list of finite numbers")
        _seeds(arm.get("seeds"), path, f"{field}.seeds")
        if len(arm["seeds"]) != len(values):
            _fail(path, f"{field}.seeds", f"{len(arm['seeds'])} entries for {len(values)} "
                  "measured values; list each value's run `--seed` (its `config.seed`), in the "
                  "same order")
    elif kind == "summary":
        if not _is_number(arm["mean"]):
            _fail(path, f"{field}.mean", "must be a finite number")
        if not _is_number(arm.get("std")) or arm["std"] < 0:
            _fail(path, f"{field}.std", "must be a finite number >= 0")
        _seeds(arm.get("seeds"), path, f"{field}.seeds")
    elif not _is_number(arm["value"]):
        _fail(path, f"{field}.value", "must be a finite number")
    for key in ("metric", "note"):
        if key in arm:
            _text(arm, key, path, f"{field}.{key}")
    _decimals(arm, path, field)


def _validate_comparison(c, i: int, record: Mapping, path: str) -> None:
    field = f"comparisons[{i}]"
    if not isinstance(c, dict):
        _fail(path, field, "must be an object")
    for key in c:
        if key not in ("claim", "a", "b", "published", "expect", "rule"):
            _fail(path, f"{field}.{key}", "unknown field")
    _text(c, "claim", path, f"{field}.claim")
    if c.get("expect") not in EXPECTS:
        _fail(path, f"{field}.expect", f"must be one of {', '.join(EXPECTS)}")
    if c.get("rule") not in RULES:
        _fail(path, f"{field}.rule", f"must be one of {', '.join(RULES)}")
    arms = record["arms"]
    if c.get("a") not in arms:
        _fail(path, f"{field}.a", f"names no arm: {c.get('a')!r}")
    if ("b" in c) == ("published" in c):
        _fail(path, field, "needs exactly one of 'b' (an arm) and 'published' (a published key)")
    if "b" in c and c["b"] not in arms:
        _fail(path, f"{field}.b", f"names no arm: {c['b']!r}")
    if "published" in c and c["published"] not in record["published"]:
        _fail(path, f"{field}.published", f"names no published number: {c['published']!r}")
    if "b" in c and c["a"] == c["b"]:
        _fail(path, f"{field}.b", "compares an arm with itself")
    a_seeded = arm_kind(arms[c["a"]]) != "fixed"
    b_seeded = "b" in c and arm_kind(arms[c["b"]]) != "fixed"
    if not a_seeded:
        _fail(path, f"{field}.a", "must be an arm with a random seed ('values' or 'mean')")
    if c["rule"] == "welch" and not b_seeded:
        _fail(path, f"{field}.rule", "'welch' needs 'b' to be an arm with a random seed; use '2se' "
                                     "against a fixed or published number")
    if c["rule"] == "2se" and b_seeded:
        _fail(path, f"{field}.rule", "'2se' needs a fixed arm or a published number as 'b'; use "
                                     "'welch' for two arms with a random seed")


def validate(record, path: str) -> dict:
    """Checks a record against the schema; returns it. ValueError: ``PATH: FIELD: problem``."""
    if not isinstance(record, dict):
        _fail(path, "(top level)", "must be a JSON object")
    for key in _REQUIRED:
        if key not in record:
            _fail(path, key, "missing")
    for key in record:
        if key not in _REQUIRED + _OPTIONAL:
            _fail(path, key, "unknown field")
    stem = os.path.splitext(os.path.basename(path))[0]
    if record["name"] != stem:
        _fail(path, "name", f"is {record['name']!r}; the file is {stem}.json")
    if not isinstance(record["number"], int) or isinstance(record["number"], bool) \
            or record["number"] < 1:
        _fail(path, "number", "must be a positive integer")
    for key in ("title", "claim", "source", "metric", "protocol"):
        _text(record, key, path)
    for key in ("label", "section"):
        if key in record:
            _text(record, key, path)
    _decimals(record, path, "(top level)")
    command = record["command"]
    if not (isinstance(command, str) and command.strip()) and not (
            isinstance(command, list) and command
            and all(isinstance(x, str) and x.strip() for x in command)):
        _fail(path, "command", "must be a non-empty string or list of strings")
    cost = record["cost"]
    if not isinstance(cost, dict):
        _fail(path, "cost", "must be an object")
    for key in cost:
        if key not in ("wall_seconds", "cpu"):
            _fail(path, f"cost.{key}", "unknown field")
    wall = cost.get("wall_seconds")
    if not (wall is None or (_is_number(wall) and wall >= 0) or (
            isinstance(wall, list) and len(wall) == 2 and all(map(_is_number, wall))
            and 0 <= wall[0] <= wall[1])):
        _fail(path, "cost.wall_seconds", "must be null, a number >= 0 or a range [low, high]")
    _text(cost, "cpu", path, "cost.cpu")
    published = record["published"]
    if not isinstance(published, dict):
        _fail(path, "published", "must be an object")
    for key, entry in published.items():
        field = f"published.{key}"
        if not isinstance(entry, dict) or not _is_number(entry.get("value")):
            _fail(path, f"{field}.value", "must be a finite number")
        for k in entry:
            if k not in ("value", "dataset", "source", "decimals"):
                _fail(path, f"{field}.{k}", "unknown field")
        for k in ("dataset", "source"):
            if k in entry:
                _text(entry, k, path, f"{field}.{k}")
        _decimals(entry, path, field)
    arms = record["arms"]
    if not isinstance(arms, dict) or not arms:
        _fail(path, "arms", "must be a non-empty object")
    for key, arm in arms.items():
        _validate_arm(arm, path, f"arms.{key}")
    if not isinstance(record["comparisons"], list):
        _fail(path, "comparisons", "must be a list")
    for i, c in enumerate(record["comparisons"]):
        _validate_comparison(c, i, record, path)
    return record


def load(path: str) -> dict:
    """One record, validated. ValueError (one line, naming the file and field) on bad input."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: (json): {e.msg} at line {e.lineno} column {e.colno}") from None
    return validate(record, path)


def load_all(directory: str | None = None) -> list[dict]:
    """Every ``*.json`` record in ``directory`` (default: experiments/results), ordered by
    ``number`` (which must be unique)."""
    directory = directory or RESULTS_DIR
    records = [load(os.path.join(directory, f))
               for f in sorted(os.listdir(directory)) if f.endswith(".json")]
    seen: dict[int, str] = {}
    for r in records:
        if r["number"] in seen:
            _fail(os.path.join(directory, f"{r['name']}.json"), "number",
                  f"{r['number']} is also the number of {seen[r['number']]}.json")
        seen[r["number"]] = r["name"]
    return sorted(records, key=lambda r: r["number"])


def dumps(obj: Any, indent: int = 0) -> str:
    """JSON with two-space indentation and lists of plain values on one line (records' format)."""
    pad = "  " * indent
    if isinstance(obj, dict) and obj:
        items = [f"{pad}  {json.dumps(k, ensure_ascii=False)}: {dumps(v, indent + 1)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        items = [f"{pad}  {dumps(v, indent + 1)}" for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


def write(path: str, record: Mapping) -> None:
    validate(record, path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(dumps(record) + "\n")


# --------------------------------------------------------------------------- recording


def record_many(name: str, entries: Iterable[tuple[str, int | None, float]], *,
                wall_seconds: float | None = None, directory: str | None = None) -> dict:
    """Adds ``(arm, seed, value)`` entries to the record ``NAME.json`` and writes it once.

    A value (kept to 10 significant digits) replaces the arm's value for the same seed; an arm
    that kept only a mean and a std is replaced by the new per-seed values. ``seed`` is None for
    an arm with no random seed.
    ``wall_seconds`` replaces the record's cost. Returns the record as written.

    Raises:
      ValueError: the record is invalid, does not declare the arm, or the seed does not fit the
        arm's form.
    """
    path = os.path.join(directory or RESULTS_DIR, f"{name}.json")
    rec = load(path)
    replaced: set[str] = set()
    for arm, seed, value in entries:
        field = f"arms.{arm}"
        if arm not in rec["arms"]:
            _fail(path, "arms", f"declares no arm {arm!r} (add it, with its comparisons, first)")
        entry = rec["arms"][arm]
        try:
            value = float(value)
        except (TypeError, ValueError):
            _fail(path, field, f"refusing a value that is not a number: {value!r}")
        if not math.isfinite(value):
            _fail(path, field, f"refusing a value that is not finite: {value!r}")
        value = float(f"{value:.10g}")  # 29.0, not 28.999999999999996 from 100 * 0.29
        if arm_kind(entry) == "fixed":
            if seed is not None:
                _fail(path, field, "has no random seed; record it with seed None")
            entry["value"] = value
            continue
        if (seed is None or isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                or seed < 0):
            _fail(path, field, f"needs a non-negative integer seed, got {seed!r}")
        if arm_kind(entry) == "summary" and arm not in replaced:
            extras = {k: entry[k] for k in _ARM_EXTRAS if k in entry}
            entry.clear()
            entry.update(values=[], seeds=[], **extras)
        replaced.add(arm)
        by_seed = dict(zip(entry["seeds"], entry["values"]))
        by_seed[int(seed)] = value
        entry["seeds"] = sorted(by_seed)
        entry["values"] = [by_seed[s] for s in entry["seeds"]]
    if wall_seconds is not None:
        rec["cost"]["wall_seconds"] = round(float(wall_seconds), 1)
    write(path, rec)
    return rec


def record(name: str, arm: str, seed: int | None, value: float, *,
           wall_seconds: float | None = None, directory: str | None = None) -> dict:
    """Adds one arm's value for one seed to ``experiments/results/NAME.json`` (see record_many)."""
    return record_many(name, [(arm, seed, value)], wall_seconds=wall_seconds, directory=directory)


def default_run(parser: argparse.ArgumentParser, args: argparse.Namespace,
                ignore: Sequence[str] = ("workdir", "seed")) -> bool:
    """Whether a script ran its documented setting: every option but ``ignore`` at its default.

    Only such runs go into the records; ``--quick`` and other settings do not.
    """
    return all(value == parser.get_default(key)
               for key, value in vars(args).items() if key not in ignore)


# --------------------------------------------------------------------------- statistics, verdicts


@dataclasses.dataclass(frozen=True)
class Stats:
    """An arm's numbers: mean, sample standard deviation (None below 2 seeds or without a random
    seed), the number of seeds (0 without a random seed), and the values when kept."""

    mean: float
    std: float | None
    n: int
    values: tuple[float, ...] | None = None


def stats(arm: Mapping) -> Stats:
    kind = arm_kind(arm)
    if kind == "fixed":
        return Stats(float(arm["value"]), None, 0)
    if kind == "summary":
        n = len(arm["seeds"])
        return Stats(float(arm["mean"]), float(arm["std"]) if n > 1 else None, n)
    v = np.asarray(arm["values"], float)
    return Stats(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None, len(v),
                 tuple(float(x) for x in v))


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Welch's two-sided t-test of two samples: ``(t, p)``; t > 0 when mean(a) > mean(b)."""
    from scipy import stats as sps

    r = sps.ttest_ind(np.asarray(a, float), np.asarray(b, float), equal_var=False)
    return float(r.statistic), float(r.pvalue)


def _welch_stats(a: Stats, b: Stats) -> tuple[float, float]:
    if a.values is not None and b.values is not None:
        return welch(a.values, b.values)
    from scipy import stats as sps

    r = sps.ttest_ind_from_stats(a.mean, a.std, a.n, b.mean, b.std, b.n, equal_var=False)
    return float(r.statistic), float(r.pvalue)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """``outcome``: "holds", "does not hold" or "inconclusive"; ``reason``: why, in a few words;
    ``difference``: mean of a minus b; ``t``, ``p`` (Welch) or ``two_se`` (2 SE) when computed."""

    outcome: str
    reason: str
    difference: float
    t: float | None = None
    p: float | None = None
    two_se: float | None = None

    def __str__(self) -> str:
        return f"{self.outcome} ({self.reason})"


def _direction(difference: float) -> str:
    return "less" if difference < 0 else "greater"


def _decide(expect: str, difference: float) -> str:
    return "holds" if expect != "equal" and _direction(difference) == expect else "does not hold"


def _seed_count(ns: Sequence[int]) -> str:
    if len(set(ns)) == 1:
        return f"{ns[0]} seed{'s' if ns[0] != 1 else ''}"
    return f"{' and '.join(map(str, ns))} seeds"


def verdict(comparison: Mapping, arms: Mapping[str, Mapping],
            published: Mapping[str, Mapping] | None = None) -> Verdict:
    """The verdict of one comparison of a record, by the rule in this module's docstring."""
    a = stats(arms[comparison["a"]])
    if "b" in comparison:
        b = stats(arms[comparison["b"]])
    else:
        b = Stats(float((published or {})[comparison["published"]]["value"]), None, 0)
    difference = a.mean - b.mean
    expect, rule = comparison["expect"], comparison["rule"]
    if rule == "welch":
        if min(a.n, b.n) < MIN_SEEDS:
            per_arm = "" if a.n == b.n else " per arm"
            return Verdict("inconclusive", f"{_seed_count([a.n, b.n])}; rule needs >= {MIN_SEEDS}"
                                           f"{per_arm}", difference)
        if a.std == 0 and b.std == 0:
            return Verdict("inconclusive", "p undefined: no spread in either arm", difference)
        t, p = _welch_stats(a, b)
        if not math.isfinite(p):
            return Verdict("inconclusive", "p undefined: no spread in either arm", difference, t, p)
        if p < ALPHA:
            return Verdict(_decide(expect, difference), _p(p), difference, t, p)
        return Verdict("inconclusive", _p(p), difference, t, p)
    if a.n < MIN_SEEDS:
        return Verdict("inconclusive", f"{_seed_count([a.n])}; rule needs >= {MIN_SEEDS}",
                       difference)
    two_se = 2 * a.std / math.sqrt(a.n)
    if abs(difference) > two_se:
        return Verdict(_decide(expect, difference), "difference beyond 2 SE", difference,
                       two_se=two_se)
    return Verdict("inconclusive", "difference within 2 SE", difference, two_se=two_se)


def verdicts(record: Mapping) -> list[Verdict]:
    return [verdict(c, record["arms"], record["published"]) for c in record["comparisons"]]


def tally(records: Iterable[Mapping]) -> dict[str, int]:
    """How many comparisons of ``records`` hold, do not hold, or are inconclusive."""
    counts = {"holds": 0, "does not hold": 0, "inconclusive": 0}
    for r in records:
        for v in verdicts(r):
            counts[v.outcome] += 1
    return counts


def summary_line(records: Iterable[Mapping]) -> str:
    """One sentence with the tally (README.md quotes it; a test checks that it is current)."""
    c = tally(records)
    total = sum(c.values())
    return (f"Of the {total} claims tested, {c['holds']} hold, {c['does not hold']} do not hold "
            f"and {c['inconclusive']} are inconclusive.")


# --------------------------------------------------------------------------- rendering


def _p(p: float) -> str:
    """``"p = 0.012"``, or ``"p < 0.001"``."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _fmt(x: float, decimals: int) -> str:
    s = f"{x:.{decimals}f}"
    return s[1:] if re.fullmatch(r"-0\.?0*", s) else s


def _arm_decimals(record: Mapping, entry: Mapping) -> int:
    return entry.get("decimals", record.get("decimals", 2))


def _show_arm(record: Mapping, name: str, *, long: bool) -> str:
    arm = record["arms"][name]
    d = _arm_decimals(record, arm)
    s = stats(arm)
    seeds = arm.get("seeds", [])
    if s.n == 0:
        shown, how = f"{name}: {_fmt(s.mean, d)}", "no random seed"
    elif s.n == 1:
        shown, how = f"{name}: {_fmt(s.mean, d)}", f"seed {seeds[0]}"
    else:
        shown = f"{name}: {_fmt(s.mean, d)} ± {_fmt(s.std, d)}"
        if not long:
            how = f"{s.n} seeds"
        elif s.values is not None:
            how = f"seeds {', '.join(map(str, seeds))}: {', '.join(_fmt(v, d) for v in s.values)}"
        else:
            how = f"mean ± sample std over seeds {', '.join(map(str, seeds))}"
    if long:
        how += "".join(f"; {arm[k]}" for k in ("metric", "note") if k in arm)
    return f"{shown} ({how})"


def _show_published(record: Mapping, key: str, *, tag: bool = True) -> str:
    entry = record["published"][key]
    where = [entry[k] for k in ("dataset", "source") if k in entry]
    shown = f"{key}: {_fmt(entry['value'], _arm_decimals(record, entry))}"
    where = (["published"] if tag else []) + where
    return f"{shown} ({', '.join(where)})" if where else shown


def _show_b(record: Mapping, c: Mapping, *, long: bool) -> str:
    if "b" in c:
        return _show_arm(record, c["b"], long=long)
    return _show_published(record, c["published"])


def _show_test(record: Mapping, c: Mapping, v: Verdict) -> str:
    d = _arm_decimals(record, record["arms"][c["a"]])
    if v.p is not None:
        return f"{RULE_NAMES[c['rule']]}: t = {v.t:.2f}, {_p(v.p)}"
    if v.two_se is not None:
        return (f"{RULE_NAMES[c['rule']]}: difference {_fmt(v.difference, d)}, "
                f"2 SE = {_fmt(v.two_se, d)}")
    return f"{RULE_NAMES[c['rule']]} (not run); difference {_fmt(v.difference, d)}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _cost(record: Mapping) -> str:
    wall = record["cost"]["wall_seconds"]
    if wall is None:
        seconds = "wall time not recorded"
    elif isinstance(wall, list):
        seconds = f"{wall[0]:g}-{wall[1]:g} s wall"
    else:
        seconds = f"{wall:g} s wall"
    return f"{seconds}, {record['cost']['cpu']}"


def _commands(record: Mapping) -> str:
    command = record["command"]
    commands = [command] if isinstance(command, str) else command
    return "; ".join(f"`{c}`" for c in commands)


def summary_table(records: Sequence[Mapping]) -> str:
    rows = ["| # | experiment | claim | ours (a) | against (b) | test | verdict |",
            "|---|---|---|---|---|---|---|"]
    for r in records:
        label = r.get("label", r["title"])
        if not r["comparisons"]:
            rows.append(f"| {r['number']} | {_cell(label)} | {_cell(r['claim'])} | | | | "
                        f"none (no comparison to test) |")
        for c, v in zip(r["comparisons"], verdicts(r)):
            rows.append(f"| {r['number']} | {_cell(label)} | {_cell(c['claim'])} | "
                        f"{_cell(_show_arm(r, c['a'], long=False))} | "
                        f"{_cell(_show_b(r, c, long=False))} | {RULE_NAMES[c['rule']]} | "
                        f"**{v.outcome}** ({_cell(v.reason)}) |")
    return "\n".join(rows)


def _section_text(record: Mapping, directory: str) -> str:
    path = os.path.join(directory, record.get("section", f"{record['name']}.md"))
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[0].startswith("#"):
        lines = lines[1:]
    text = "\n".join(lines).strip("\n")
    # Links written relative to experiments/results/, made relative to experiments/.
    text = text.replace("](../../", "](../")
    return re.sub(r"\]\(([\w.-]+\.(?:md|json))\)", r"](results/\1)", text)


def verdict_block(record: Mapping) -> str:
    name = record["name"]
    lines = [f"**Claims tested** (record [`results/{name}.json`](results/{name}.json); "
             f"metric: {record['metric']}; the rule is at the top of this file):", ""]
    if record["comparisons"]:
        lines += ["| claim | ours (a) | against (b) | test | verdict |", "|---|---|---|---|---|"]
        for c, v in zip(record["comparisons"], verdicts(record)):
            lines.append(f"| {_cell(c['claim'])} | "
                         f"{_cell(_show_arm(record, c['a'], long=True))} | "
                         f"{_cell(_show_b(record, c, long=True))} | "
                         f"{_cell(_show_test(record, c, v))} | **{v.outcome}** "
                         f"({_cell(v.reason)}) |")
    else:
        lines.append("No comparison to test in this record.")
    lines.append("")
    notes = [f"- Claim: {record['claim']}", f"- Source: {record['source']}"]
    if record["published"]:
        notes.append("- Published: " + "; ".join(_show_published(record, k, tag=False)
                                                  for k in record["published"]) + ".")
    other = [k for k, a in record["arms"].items()
             if not any(k in (c["a"], c.get("b")) for c in record["comparisons"])]
    if other:
        notes.append("- Also recorded: " + "; ".join(_show_arm(record, k, long=True)
                                                     for k in other) + ".")
    notes += [f"- Protocol: {record['protocol']}",
              f"- Command: {_commands(record)}; cost: {_cost(record)}."]
    return "\n".join(lines + notes)


def render(directory: str | None = None) -> str:
    """The whole of RESULTS.md: the header, the summary table, each section with its verdicts."""
    directory = directory or RESULTS_DIR
    records = load_all(directory)
    with open(os.path.join(directory, HEADER), encoding="utf-8") as f:
        header = f.read().strip("\n")
    parts = [header, summary_line(records), summary_table(records)]
    for r in records:
        parts.append(f"## {r['number']}. {r['title']}\n\n{_section_text(r, directory)}\n\n"
                     f"{verdict_block(r)}")
    return "\n\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render experiments/RESULTS.md from "
                                                 "experiments/results/*.json and *.md.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if experiments/RESULTS.md is not up to date")
    args = parser.parse_args(argv)
    rel = os.path.relpath(RESULTS_MD)
    try:
        text = render(RESULTS_DIR)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        try:
            with open(RESULTS_MD, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = ""
        if current != text:
            old, new = current.split("\n"), text.split("\n")
            line = next((i for i, (x, y) in enumerate(zip(old, new)) if x != y),
                        min(len(old), len(new))) + 1
            print(f"{rel} is out of date (first difference at line {line}); "
                  f"run: python -m experiments.results", file=sys.stderr)
            return 1
        print(f"{rel} is up to date")
        return 0
    with open(RESULTS_MD, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {rel} ({len(load_all(RESULTS_DIR))} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
