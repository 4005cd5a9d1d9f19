"""experiments.results: the records, the rule that computes verdicts, and RESULTS.md as its output.

Pure Python and fast: no training; the repro scripts' record_entries run on made-up results.
"""

import copy
import json
import math
import os
import shutil

import numpy as np
import pytest
from scipy import stats as sps

from experiments import results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def arm(*values, seeds=None):
    seeds = range(len(values)) if seeds is None else seeds
    return {"values": list(values), "seeds": list(seeds)}


def minimal_record(name="toy"):
    return {
        "name": name, "number": 1, "title": "Toy", "claim": "a is below b", "source": "none",
        "published": {"paper": {"value": 2.0, "dataset": "MNIST"}},
        "metric": "error", "arms": {"a": arm(1.0, 1.1, 0.9), "b": arm(2.0, 2.2, 1.8),
                                    "fixed": {"value": 2.0}},
        "comparisons": [{"claim": "a < b", "a": "a", "b": "b", "expect": "less", "rule": "welch"}],
        "protocol": "made up", "cost": {"wall_seconds": None, "cpu": "none"},
        "command": "python -m nothing",
    }


# --------------------------------------------------------------------------- Welch's t-test


def test_welch_matches_the_formula_by_hand():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0, 10.0]
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)  # 1.6667/4, 10/5
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    p = 2 * sps.t.sf(abs(t), df)
    got_t, got_p = results.welch(a, b)
    assert got_t == pytest.approx(-2.2514, abs=1e-4) and got_t == pytest.approx(t, rel=1e-12)
    assert df == pytest.approx(5.5208, abs=1e-4)
    assert got_p == pytest.approx(p, rel=1e-10)
    assert 0.05 < got_p < 0.1


def test_welch_from_a_summary_equals_welch_from_the_values():
    """An arm that kept only mean and std gives the same test as one that kept its values."""
    a, b = [34.1, 36.5, 32.5], [29.5, 30.4, 29.8]
    by_values = results.verdict({"a": "a", "b": "b", "expect": "less", "rule": "welch"},
                                {"a": arm(*a), "b": arm(*b)})
    summary = {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)), "seeds": [0, 1, 2]}
               for k, v in (("a", a), ("b", b))}
    by_summary = results.verdict({"a": "a", "b": "b", "expect": "less", "rule": "welch"}, summary)
    assert by_values.p == pytest.approx(by_summary.p, rel=1e-9)
    assert by_values.p == pytest.approx(results.welch(a, b)[1], rel=1e-12)
    assert by_values.outcome == by_summary.outcome


# --------------------------------------------------------------------------- verdicts


def welch_verdict(a, b, expect="less"):
    return results.verdict({"a": "a", "b": "b", "expect": expect, "rule": "welch"},
                           {"a": arm(*a), "b": arm(*b)})


def test_fewer_than_three_seeds_is_inconclusive_however_large_the_difference():
    v = welch_verdict([1.0], [100.0])
    assert (v.outcome, v.reason) == ("inconclusive", "1 seed; rule needs >= 3")
    assert str(v) == "inconclusive (1 seed; rule needs >= 3)"
    assert v.p is None and v.difference == -99.0
    v = welch_verdict([1.0, 1.1], [100.0, 101.0, 99.0])
    assert (v.outcome, v.reason) == ("inconclusive", "2 and 3 seeds; rule needs >= 3 per arm")
    v = results.verdict({"a": "a", "published": "p", "expect": "less", "rule": "2se"},
                        {"a": arm(1.0, 1.1)}, {"p": {"value": 50.0}})
    assert (v.outcome, v.reason) == ("inconclusive", "2 seeds; rule needs >= 3")


def test_welch_significant_difference_holds_or_does_not_hold_by_direction():
    a, b = [1.0, 1.1, 0.9], [2.0, 2.1, 1.9]
    assert welch_verdict(a, b, "less").outcome == "holds"
    assert welch_verdict(a, b, "greater").outcome == "does not hold"
    assert welch_verdict(b, a, "greater").outcome == "holds"
    # An expected equality is refuted by a significant difference...
    assert welch_verdict(a, b, "equal").outcome == "does not hold"
    # ... and never confirmed without one.
    assert welch_verdict(a, [1.05, 0.95, 1.0], "equal").outcome == "inconclusive"
    v = welch_verdict(a, b)
    assert v.p < 0.05 and v.reason == results._p(v.p)


def test_welch_not_significant_is_inconclusive():
    v = welch_verdict([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])
    assert v.outcome == "inconclusive" and v.p > 0.05


def test_no_spread_in_either_arm_is_inconclusive():
    v = welch_verdict([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    assert v.outcome == "inconclusive"


def test_two_standard_errors_against_a_fixed_number():
    arms = {"a": arm(1.0, 1.1, 0.9), "fixed": {"value": 2.0}, "near": {"value": 1.05}}
    two_se = 2 * 0.1 / math.sqrt(3)
    v = results.verdict({"a": "a", "b": "fixed", "expect": "less", "rule": "2se"}, arms)
    assert v.outcome == "holds" and v.two_se == pytest.approx(two_se)
    v = results.verdict({"a": "a", "b": "fixed", "expect": "greater", "rule": "2se"}, arms)
    assert v.outcome == "does not hold"
    v = results.verdict({"a": "a", "b": "near", "expect": "less", "rule": "2se"}, arms)
    assert (v.outcome, v.reason) == ("inconclusive", "difference within 2 SE")
    v = results.verdict({"a": "a", "b": "near", "expect": "equal", "rule": "2se"}, arms)
    assert v.outcome == "inconclusive"
    v = results.verdict({"a": "a", "published": "p", "expect": "equal", "rule": "2se"}, arms,
                        {"p": {"value": 0.5}})
    assert v.outcome == "does not hold"


def test_the_committed_records_give_the_verdicts_the_readme_states():
    records = results.load_all()
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert results.summary_line(records) in " ".join(readme.split())


def test_every_comparison_of_the_committed_records_rests_on_at_least_3_seeds():
    for r in results.load_all():
        for c in r["comparisons"]:
            for k in ("a", "b"):
                if k in c and results.arm_kind(r["arms"][c[k]]) != "fixed":
                    assert len(r["arms"][c[k]].get("seeds", [])) >= 3, (r["name"], c["claim"])


# --------------------------------------------------------------------------- bad records


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def broken(mutate):
    r = minimal_record()
    mutate(r)
    return r


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.pop("claim"), "claim: missing"),
    (lambda r: r.update(verdict="holds"), "verdict: unknown field"),
    (lambda r: r.update(name="other"), "name: is 'other'"),
    (lambda r: r["arms"]["a"].update(values=[1.0, "x", 2.0]), "arms.a.values:"),
    (lambda r: r["arms"]["a"].update(seeds=[0, 1]),
     "arms.a.seeds: 2 entries for 3 measured values; list each value's run `--seed`"),
    (lambda r: r["arms"]["a"].update(seeds=[0, 0, 1]), "arms.a.seeds: repeats a seed"),
    (lambda r: r["arms"]["b"].update(value=3.0), "arms.b: needs exactly one of"),
    (lambda r: r["comparisons"][0].update(b="nope"), "comparisons[0].b: names no arm: 'nope'"),
    (lambda r: r["comparisons"][0].update(expect="smaller"), "comparisons[0].expect:"),
    (lambda r: r["comparisons"][0].update(b="fixed"), "comparisons[0].rule: 'welch' needs"),
    (lambda r: r["comparisons"][0].update(rule="2se"), "comparisons[0].rule: '2se' needs"),
    (lambda r: r["comparisons"][0].update(published="paper"), "comparisons[0]: needs exactly one"),
    (lambda r: r["cost"].update(wall_seconds=-1), "cost.wall_seconds:"),
    (lambda r: r["published"]["paper"].update(value=float("nan")), "published.paper.value:"),
])
def test_a_bad_record_is_one_line_naming_the_file_and_the_field(tmp_path, mutate, field):
    path = write_json(tmp_path / "toy.json", broken(mutate))
    with pytest.raises(ValueError) as e:
        results.load(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and field in message and "\n" not in message


def test_a_record_that_is_not_json_names_the_file(tmp_path):
    path = tmp_path / "toy.json"
    path.write_text('{"name": "toy",}')
    with pytest.raises(ValueError, match=rf"^{path}: \(json\): .* line 1 column"):
        results.load(str(path))


def test_two_records_with_one_number_are_refused(tmp_path):
    write_json(tmp_path / "toy.json", minimal_record())
    write_json(tmp_path / "other.json", minimal_record("other"))
    with pytest.raises(ValueError, match=r"toy\.json: number: 1 is also the number of other\.json"):
        results.load_all(str(tmp_path))


# --------------------------------------------------------------------------- recording


def test_record_adds_and_replaces_values_by_seed(tmp_path):
    path = tmp_path / "toy.json"
    results.write(str(path), minimal_record())
    results.record("toy", "a", 5, 1.5, directory=str(tmp_path))
    rec = results.record("toy", "a", 1, 7.0, wall_seconds=12.34, directory=str(tmp_path))
    assert rec["arms"]["a"] == {"values": [1.0, 7.0, 0.9, 1.5], "seeds": [0, 1, 2, 5]}
    assert rec["cost"]["wall_seconds"] == 12.3
    assert results.load(str(path)) == rec
    results.record("toy", "fixed", None, np.float32(2.5), directory=str(tmp_path))
    assert results.load(str(path))["arms"]["fixed"] == {"value": 2.5}
    # The file keeps the format of the committed records.
    assert path.read_text() == results.dumps(results.load(str(path))) + "\n"


def test_record_replaces_a_summary_with_the_new_values(tmp_path):
    r = minimal_record()
    r["arms"]["a"] = {"mean": 1.0, "std": 0.1, "seeds": [0, 1, 2], "note": "kept"}
    results.write(str(tmp_path / "toy.json"), r)
    rec = results.record_many("toy", [("a", 0, 3.0), ("a", 1, 4.0)], directory=str(tmp_path))
    assert rec["arms"]["a"] == {"values": [3.0, 4.0], "seeds": [0, 1], "note": "kept"}


@pytest.mark.parametrize("arm_name, seed, value, match", [
    ("nope", 0, 1.0, "arms: declares no arm 'nope'"),
    ("fixed", 0, 1.0, "arms.fixed: has no random seed"),
    ("a", None, 1.0, "arms.a: needs a non-negative integer seed"),
    ("a", 0, float("inf"), "arms.a: refusing a value that is not finite"),
])
def test_record_refuses_what_does_not_fit(tmp_path, arm_name, seed, value, match):
    path = tmp_path / "toy.json"
    results.write(str(path), minimal_record())
    before = path.read_text()
    with pytest.raises(ValueError, match=match):
        results.record("toy", arm_name, seed, value, directory=str(tmp_path))
    assert path.read_text() == before


def test_default_run_only_for_the_documented_setting():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="runs/x")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=2)
    assert results.default_run(parser, parser.parse_args(["--workdir=elsewhere", "--seed=3"]))
    assert not results.default_run(parser, parser.parse_args(["--quick"]))
    assert not results.default_run(parser, parser.parse_args(["--epochs=5"]))


def made_up_results():
    """What each wired script's record_entries reads, with made-up numbers."""
    from experiments import (repro_cae, repro_denoising, repro_filters, repro_generation,
                             repro_linear_pca, repro_m1, repro_retrieval, repro_semisupervised,
                             repro_sparse, repro_upscaling, repro_vae)

    methods = ("autoencoder code + MLP(64)", "pixels + MLP(64)", "CNN from scratch")
    return {
        "denoising": repro_denoising.record_entries(
            {"rows": {"clean": {"plain": 9.0},
                      **{n: {"plain": 20.0, "denoising": 10.0} for n in repro_denoising.NOISES}}}),
        "linear_pca": repro_linear_pca.record_entries(
            {"autoencoder_squared_error_per_image": 16.0, "pca_squared_error_per_image": 16.0,
             "max_angle_deg": {"decoder_rows": 20.0, "decoder_rows_vs_top_k_plus_1": 1.0}}),
        "sparse": repro_sparse.record_entries({"rows": [
            {"kind": "l1", "weight": w, "mean_activation": 2.0 - w} for w in repro_sparse.L1_WEIGHTS
        ] + [{"kind": "kl", "weight": w, "mean_activation": 0.1}
             for w in repro_sparse.KL_WEIGHTS]
          + [{"kind": "ng", "weight": repro_sparse.NG_BETA, "mean_activation": 0.06}]}),
        "upscaling": repro_upscaling.record_entries(
            {"test": {k: {"psnr_db": 20.0} for k in ("autoencoder", "bicubic", "nearest")}}),
        "cae": repro_cae.record_entries({
            "chosen": {k: v[0] for k, v in repro_cae.GRID.items()}, "seeds_done": [3],
            "probes": {"pixels": {"logistic": {"test_error": 0.16}},
                       "random_seed3": {"finetune": {"test_error": 0.13}},
                       **{repro_cae.run_name(k, v[0], 3): {
                           "logistic": {"test_error": 0.15}, "finetune": {"test_error": 0.1},
                           "measures": {"jacobian_frobenius_mean": 3.0, "saturation": 0.4}}
                          for k, v in repro_cae.GRID.items()}}}),
        "m1": repro_m1.record_entries([{"seed": 3, "errors": {
            f: {str(n): {k: [20.0, 22.0] for k in repro_m1.CLASSIFIERS}
                for n in repro_m1.LABEL_COUNTS} for f in repro_m1.FEATURES}}]),
        "retrieval": repro_retrieval.record_entries(
            {"setting": {"seed": 1}, "results": {
                "bits": [16, 32, 64], "pixels": {"1": 0.8},
                "codes": {str(b): {"binary_0.5": {"1": 0.5}} for b in (16, 32, 64)}}}),
        "filters": repro_filters.record_entries(
            {"setting": {"seed": 1}, "results": {"mlp": {"test_squared_error_per_image": 9.0},
                                                  "conv": {"test_squared_error_per_image": 14.0}}}),
        "semisupervised": repro_semisupervised.record_entries(
            {"seeds": [0, 1, 2], "errors": {m: {str(n): [0.30, 0.31, 0.29]
                                                 for n in repro_semisupervised.SIZES}
                                             for m in methods}}),
        "vae": repro_vae.record_entries(
            {"vae50": {"test_elbo_subset": -239.0, "test_iwae_nll_subset": 237.0,
                       "test_elbo_full": -240.0, "active_units": 9},
             "vae2d": {"test_elbo_dynamic": -234.0}}, 1),
        "generation": repro_generation.record_entries(
            {"test_code_log_likelihood_nats": {"gaussian": -28.0, "gmm_40": -17.0},
             "gmm_components": 40}, 1),
    }


def test_each_script_records_every_arm_its_record_compares(tmp_path):
    directory = tmp_path / "results"
    shutil.copytree(results.RESULTS_DIR, directory)
    for name, entries in made_up_results().items():
        rec = results.record_many(name, entries, wall_seconds=1.0, directory=str(directory))
        recorded = {a for a, _, _ in entries}
        compared = {c[k] for c in rec["comparisons"] for k in ("a", "b") if k in c}
        assert compared <= recorded, (name, compared - recorded)
    # Percentages where the records keep percentages.
    semi = results.load(str(directory / "semisupervised.json"))
    assert semi["arms"]["pixels + MLP(64), 100 labels"] == {"values": [30.0, 31.0, 29.0],
                                                             "seeds": [0, 1, 2]}
    cae = results.load(str(directory / "cae.json"))
    assert cae["arms"]["CAE, fine-tuned 784-1000-10, test error"]["seeds"][-1] == 3
    assert cae["arms"]["CAE, fine-tuned 784-1000-10, test error"]["values"][-1] == 10.0
    m1 = results.load(str(directory / "m1.json"))
    assert m1["arms"]["VAE (M1) + RBF SVM, 100 labels"]["values"][-1] == 21.0


# --------------------------------------------------------------------------- RESULTS.md


def test_the_committed_records_are_valid_and_in_their_written_format():
    for name in sorted(os.listdir(results.RESULTS_DIR)):
        if name.endswith(".json"):
            path = os.path.join(results.RESULTS_DIR, name)
            with open(path, encoding="utf-8") as f:
                assert f.read() == results.dumps(results.load(path)) + "\n", name


def test_render_equals_the_committed_results_md_byte_for_byte():
    with open(results.RESULTS_MD, encoding="utf-8", newline="") as f:
        committed = f.read()
    assert results.render() == committed, "run: python -m experiments.results"


def test_render_shows_each_verdict_and_number():
    text = results.render()
    assert "**inconclusive** (p = 0.103)" in text  # semi-supervised, 100 labels
    assert "**holds** (p = 0.008)" in text  # CNN against pixels, 200 labels
    assert "**holds** (p < 0.001)" in text  # IWAE against VAE
    assert "**inconclusive** (p = 0.070)" in text  # IWAE active units, 121 epochs
    assert "(1 seed; rule needs >= 3)" not in text  # every comparison has its seeds
    assert "34.03 ± 2.55 (seeds 0, 1, 2: 36.56, 34.08, 31.46)" in text
    assert "](../docs/" in text and "](../../docs/" not in text


def test_main_check_fails_on_a_stale_file_and_passes_after_writing(tmp_path, monkeypatch, capsys):
    target = tmp_path / "RESULTS.md"
    target.write_text("stale\n")
    monkeypatch.setattr(results, "RESULTS_MD", str(target))
    assert results.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "is out of date (first difference at line 1)" in err and err.count("\n") == 1
    assert results.main([]) == 0
    assert results.main(["--check"]) == 0
    assert target.read_text() == results.render()


def test_main_reports_a_bad_record_in_one_line(tmp_path, monkeypatch, capsys):
    directory = tmp_path / "results"
    shutil.copytree(results.RESULTS_DIR, directory)
    rec = json.loads((directory / "vae.json").read_text())
    rec["comparisons"][0]["rule"] = "t-test"
    (directory / "vae.json").write_text(json.dumps(rec))
    monkeypatch.setattr(results, "RESULTS_DIR", str(directory))
    assert results.main(["--check"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {directory / 'vae.json'}: comparisons[0].rule: "
                   f"must be one of welch, 2se\n")
