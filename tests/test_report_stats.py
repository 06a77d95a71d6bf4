"""Paired statistics of the report (`lorsbench.report.stats`) against independent formulas, and the report's
"Paired comparisons" section end to end on synthetic run folders (run.json + samples.jsonl.gz + perplexity windows).
"""
from __future__ import annotations

import gzip
import json
import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lorsbench.report import StatsOptions, write_report
from lorsbench.report.__main__ import main
from lorsbench.report.stats import (benjamini_hochberg, mcnemar_exact, mde_paired, paired_bootstrap,
                                    paired_perplexity)


def _exact_two_sided(gains: int, losses: int) -> float:
    """McNemar's exact p by hand: twice the smaller binomial(n, 1/2) tail, in exact fractions."""
    n, k = gains + losses, min(gains, losses)
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2 ** n)
    return float(min(Fraction(1), 2 * tail))


def _pairs(both: int, gains: int, losses: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    method = np.array([1] * both + [1] * gains + [0] * losses + [0] * neither)
    reference = np.array([1] * both + [0] * gains + [1] * losses + [0] * neither)
    return method, reference


def test_mcnemar_textbook_tables():
    # Agresti, Categorical Data Analysis (2nd ed.), Table 10.1: approval of the prime minister in two surveys
    # (794 approve twice, 150 approve then disapprove, 86 disapprove then approve, 570 disapprove twice).
    first, second = _pairs(794, 150, 86, 570)
    result = mcnemar_exact(first, second)
    assert (result.gains, result.losses) == (150, 86)
    assert result.p_value == pytest.approx(_exact_two_sided(150, 86), rel=1e-9)
    assert result.p_value < 1e-4
    # A small table: 2 vs 10 discordant -> p = 2 * (1 + 12 + 66) / 4096.
    small = mcnemar_exact(*_pairs(30, 2, 10, 8))
    assert small.p_value == pytest.approx(158 / 4096, rel=1e-12)
    assert mcnemar_exact(*_pairs(30, 10, 2, 8)).p_value == pytest.approx(small.p_value, rel=1e-12)
    assert mcnemar_exact(*_pairs(5, 0, 0, 5)).p_value == 1.0
    with pytest.raises(ValueError, match="equal length"):
        mcnemar_exact([1, 0], [1])


def _simulate(rng, n_docs, p_ref, gain_rate, loss_rate):
    """Reference correctness ~ Bernoulli(p_ref); the method flips wrong -> right and right -> wrong at the rates."""
    ref = rng.random(n_docs) < p_ref
    u = rng.random(n_docs)
    method = np.where(ref, u >= loss_rate, u < gain_rate)
    return method.astype(float), ref.astype(float)


def test_bootstrap_of_identical_runs_is_zero():
    rng = np.random.default_rng(1)
    tasks = [(rng.random(n) < 0.6).astype(float) for n in (300, 500, 200)]
    result = paired_bootstrap(tasks, tasks, resamples=500, rng=0)
    assert result.difference == 0.0 and result.ci_low == 0.0 and result.ci_high == 0.0
    assert result.p_value == 1.0 and set(result.task_differences) == {0.0}


def test_bootstrap_of_exchangeable_runs_is_centred_on_zero_with_the_analytic_se():
    rng = np.random.default_rng(2)
    pairs = [_simulate(rng, n, 0.6, 0.1, 0.1 * 0.4 / 0.6) for n in (800, 800, 800)]  # no true effect
    a, b = [m for m, _ in pairs], [r for _, r in pairs]
    result = paired_bootstrap(a, b, resamples=2000, rng=0)
    assert result.ci_low < 0 < result.ci_high
    assert abs((result.ci_low + result.ci_high) / 2 - result.difference) < 0.25 * (result.ci_high - result.ci_low)
    # Independent float64 formula: SE of the equally weighted mean of per-task paired mean differences.
    se = math.sqrt(sum(np.var(x - y) / x.size for x, y in zip(a, b))) / len(a)
    assert result.se == pytest.approx(se, rel=0.1)


def test_planted_difference_is_recovered():
    rng = np.random.default_rng(3)
    loss = 0.05
    gain = (0.03 + 0.55 * loss) / 0.45  # expected method - reference = 0.45 * gain - 0.55 * loss = +3 points
    pairs = [_simulate(rng, 500, 0.55, gain, loss) for _ in range(4)]
    result = paired_bootstrap([m for m, _ in pairs], [r for _, r in pairs], resamples=2000, rng=0)
    observed = np.mean([m.mean() - r.mean() for m, r in pairs])
    assert result.difference == pytest.approx(observed, abs=1e-12)
    assert 0 < result.ci_low < 0.03 < result.ci_high
    assert result.p_value < 0.01


def test_two_level_bootstrap_is_wider_when_seeds_vary():
    rng = np.random.default_rng(4)
    ref = [(rng.random(600) < 0.5).astype(float) for _ in range(3)]
    seeds = []
    for effect in (-0.03, 0.01, 0.05):  # three training seeds that differ by several points
        seeds.append([_simulate_from(rng, r, effect) for r in ref])
    method = [np.stack([s[t] for s in seeds]) for t in range(3)]  # (seeds, documents) per task
    one = paired_bootstrap(method, ref, resamples=2000, rng=0, resample_seeds=False)
    two = paired_bootstrap(method, ref, resamples=2000, rng=0)
    assert two.two_level and not one.two_level
    assert one.difference == two.difference
    assert (two.ci_high - two.ci_low) > 1.3 * (one.ci_high - one.ci_low)


def _simulate_from(rng, ref, effect):
    """A method run that flips 10 % of the reference's documents plus `effect` more wrong -> right."""
    wrong, right = np.flatnonzero(ref == 0), np.flatnonzero(ref == 1)
    n_loss = int(0.05 * ref.size)
    n_gain = n_loss + round(effect * ref.size)
    out = ref.copy()
    out[rng.choice(wrong, n_gain, replace=False)] = 1
    out[rng.choice(right, n_loss, replace=False)] = 0
    return out


# Benjamini & Hochberg (1995), section 4: the 15 p-values of the myocardial-infarction study; at q = 0.05 the
# step-up procedure rejects the 4 smallest.
BH_1995 = [0.0201, 0.0001, 0.0004, 0.0019, 0.0095, 0.0278, 0.0298, 0.0344, 0.0459, 0.3240, 0.4262, 0.5719,
           0.6528, 0.7590, 1.0000]


def test_benjamini_hochberg_textbook():
    p = np.array(BH_1995)
    m = p.size
    ranked = np.sort(p)
    expected_sorted = [min(min(ranked[j] * m / (j + 1) for j in range(i, m)), 1.0) for i in range(m)]
    adjusted = benjamini_hochberg(p)
    assert np.allclose(np.sort(adjusted), expected_sorted, rtol=1e-12)
    assert adjusted[1] == pytest.approx(0.0001 * 15, rel=1e-12)
    assert sorted(p[adjusted <= 0.05]) == [0.0001, 0.0004, 0.0019, 0.0095]
    assert adjusted[np.argsort(p)].tolist() == sorted(adjusted.tolist())  # order preserved


def test_benjamini_hochberg_rejects_bad_p():
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        benjamini_hochberg([0.1, 1.5])


def test_mde_matches_the_formula_and_decreases_with_n():
    z = 1.959963984540054 + 0.8416212335729143  # z_{0.975} + z_{0.8}
    assert mde_paired([0.2], [500]) == pytest.approx(z * math.sqrt(0.2 / 500), rel=1e-9)
    assert mde_paired([0.2, 0.1], [400, 100]) == pytest.approx(z * math.sqrt(0.2 / 400 + 0.1 / 100) / 2, rel=1e-9)
    values = [mde_paired([0.15] * 7, [n] * 7) for n in (100, 400, 1600)]
    assert values[0] > values[1] > values[2]
    assert values[1] == pytest.approx(values[0] / 2, rel=1e-9)
    with pytest.raises(ValueError, match="positive document count"):
        mde_paired([0.1], [0])


def test_paired_perplexity():
    rng = np.random.default_rng(5)
    tokens = rng.integers(100, 200, size=40)
    ref = tokens * (3.0 + 0.3 * rng.standard_normal(40))
    same = paired_perplexity(ref, ref, tokens, resamples=500, rng=0)
    assert same.delta == 0.0 and same.ratio == 1.0 and same.ci_low == 0.0 == same.ci_high
    better = ref - tokens * (0.05 + 0.01 * rng.standard_normal(40))
    result = paired_perplexity(better, ref, tokens, resamples=1000, rng=0)
    ppl_ref, ppl_new = math.exp(ref.sum() / tokens.sum()), math.exp(better.sum() / tokens.sum())
    assert result.ppl_reference == pytest.approx(ppl_ref, rel=1e-12)
    assert result.ppl_method == pytest.approx(ppl_new, rel=1e-12)
    assert result.ratio == pytest.approx(ppl_new / ppl_ref, rel=1e-12)
    assert result.ci_low <= result.delta <= result.ci_high < 0
    assert result.ratio_ci_low < math.exp(-0.05) < result.ratio_ci_high < 1


# --- the report, end to end ---------------------------------------------------------------------------------------

TASKS = ("arc_easy", "boolq")
DOCS = 800
TOKENS = [128] * 20


def _write_run(root: Path, name: str, method: str, seed: int, correct: dict[str, np.ndarray], *,
               pruner: str = "wanda", samples: bool = True, log_ppl: float = 3.0, doc_ids=None,
               text_sha256: str = "ab" * 32) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    record = {"schema_version": 1, "status": "success", "run_name": name, "model": "m", "weights": "pretrained",
              "pruner": pruner, "pattern": "unstructured", "target_sparsity": 0.0 if pruner == "none" else 0.5,
              "method": method, "seed": seed, "eval_suite": "zeroshot7", "eval_limit": None, "smoke": False,
              "tasks": {t: {"acc": float(v.mean()), "n": int(v.size)} for t, v in correct.items()},
              "perplexity": math.exp(log_ppl)}
    if samples:
        record["samples_file"], record["perplexity_windows_file"] = "samples.jsonl.gz", "perplexity_windows.json"
        lines = []
        for task, values in correct.items():
            ids = range(values.size) if doc_ids is None else doc_ids
            for doc, value in zip(ids, values):
                lines.append(json.dumps({"task": task, "doc_id": int(doc), "acc": int(value),
                                         "acc_norm": int(value) if task == "arc_easy" else None,
                                         "margin": float(value) - 0.5}))
        with gzip.open(folder / "samples.jsonl.gz", "wt") as handle:
            handle.write("\n".join(lines) + "\n")
        nll = [t * (log_ppl + 0.01 * ((i * 7 + seed) % 5 - 2)) for i, t in enumerate(TOKENS)]
        (folder / "perplexity_windows.json").write_text(json.dumps({"nll_sum": nll, "tokens": TOKENS,
                                                                    "text_sha256": text_sha256}))
    (folder / "run.json").write_text(json.dumps(record))


def _flip(ref: np.ndarray, gains: int, losses: int, offset: int) -> np.ndarray:
    """Deterministic paired change: the first `gains` wrong documents (after `offset`) right, `losses` right wrong."""
    out = ref.copy()
    wrong, right = np.flatnonzero(ref == 0), np.flatnonzero(ref == 1)
    out[np.roll(wrong, -offset)[:gains]] = 1
    out[np.roll(right, -offset)[:losses]] = 0
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep") / "runs"
    rng = np.random.default_rng(6)
    pruned = {t: (rng.random(DOCS) < 0.5).astype(float) for t in TASKS}
    _write_run(root, "dense-s0", "none", 0, {t: _flip(v, 150, 10, 0) for t, v in pruned.items()}, pruner="none",
               log_ppl=2.5)
    _write_run(root, "none-s0", "none", 0, pruned, log_ppl=3.2)
    _write_run(root, "lora-s0", "lora", 0, {t: _flip(v, 40, 40, 3) for t, v in pruned.items()}, log_ppl=3.0)
    for seed, (gains, losses) in enumerate([(100, 20), (90, 18)]):  # lors: +10 and +9 points over pruned only
        _write_run(root, f"lors-s{seed}", "lors", seed, {t: _flip(v, gains, losses, seed) for t, v in pruned.items()},
                   log_ppl=2.9)
    _write_run(root, "sqft-s0", "sqft", 0, pruned, samples=False)
    return root


def _report(sweep: Path, out: Path, *args: str) -> str:
    assert main([str(sweep), "--name", "paired", "--out", str(out), "--resamples", "500", *args]) == 0
    return (out / "paired" / "report.md").read_text()


def _row(text: str, start: str) -> str:
    rows = [line for line in text.splitlines() if line.startswith(start)]
    assert len(rows) == 1, (start, rows)
    return rows[0]


def test_report_paired_section_and_marks(sweep, tmp_path):
    md = _report(sweep, tmp_path)
    section = md.split("## Paired comparisons")[1].split("## Cost")[0]
    assert "Metric: lm-eval `acc`" in section and "`acc_norm`" in section and "500 resamples" in section
    # lors vs pruned only: two seeds against one, both tasks +10 / +9 points, bold (survives BH).
    lors = _row(section, "| lors | pruned only | 2/1 | 1600 |")
    cells = [c.strip() for c in lors.strip("|").split("|")]
    assert cells[4].startswith("**+9.50 (") and cells[6].startswith("**+9.50 [")  # (100-20 + 90-18) / 2 / 800
    assert cells[9].endswith("(1 of 2 tasks)") and "(×" in cells[10]
    assert re.fullmatch(r"\d+\.\d\d \(\d+\.\d\d\)", cells[11])  # MDE, and with seed variance (two seeds)
    # lora vs pruned only: as many gains as losses on every task -> McNemar p = 1, nothing marked.
    lora = _row(section, "| lora | pruned only | 1/1 | 1600 |")
    assert "+0.00 (1.000)" in lora and "**" not in lora and re.fullmatch(r"\d+\.\d\d", lora.split("|")[-2].strip())
    assert _row(section, "| lors | lora | 2/1 | 1600 |").count("**") >= 2
    assert "**Minimum detectable effect reached**" in section
    assert "| `runs/sqft-s0` | no per-example record (older record) |" in section
    assert "sqft" not in _row(section, "| lors | pruned only")
    # The main accuracy table marks lors (vs lora †, vs pruned only ‡) and not lora; a legend says so.
    accuracy = md.split("## Accuracy")[1].split("## Paired comparisons")[0]
    lors_main = [c.strip() for c in _row(accuracy, "| lors | 2 |").strip("|").split("|")]
    assert lors_main[4].endswith("†‡")  # mean column
    assert "†" not in _row(accuracy, "| lora | 1 |") and "‡" not in _row(accuracy, "| lora | 1 |")
    assert "† lora / ‡ pruned only" in accuracy and "Benjamini–Hochberg" in accuracy
    assert _report(sweep, tmp_path) == md  # seeded: the same report twice
    # paired.csv: the same numbers, machine-readable.
    table = pd.read_csv(tmp_path / "paired" / "paired.csv")
    suite = table[(table["method"] == "lors") & (table["reference"] == "pruned only") & (table["task"] == "all")]
    assert len(suite) == 1 and suite["diff_acc_pts"].iloc[0] == pytest.approx(9.5)
    assert suite["ci_low_acc_pts"].iloc[0] < 9.5 < suite["ci_high_acc_pts"].iloc[0] and suite["p_bh"].iloc[0] <= 0.05
    assert suite["test"].iloc[0] == "bootstrap_two_level" and suite["delta_ppl"].iloc[0] < 0
    task = table[(table["method"] == "lora") & (table["reference"] == "pruned only") & (table["task"] == "boolq")]
    assert task[["gains", "losses", "p", "test"]].values.tolist() == [[40, 40, 1.0, "mcnemar_exact"]]


def test_report_dense_reference(sweep, tmp_path):
    md = _report(sweep, tmp_path, "--reference", "dense")
    section = md.split("## Paired comparisons")[1]
    assert _row(section, "| lora | dense | 1/1 | 1600 |")
    assert "| lors | pruned only" not in section and "† dense" in md


def test_different_documents_are_not_paired(sweep, tmp_path):
    root = tmp_path / "runs"
    rng = np.random.default_rng(7)
    _write_run(root, "none-s0", "none", 0, {t: (rng.random(DOCS) < 0.5).astype(float) for t in TASKS})
    _write_run(root, "lors-s0", "lors", 0, {t: (rng.random(300) < 0.5).astype(float) for t in TASKS},
               doc_ids=range(100, 400))
    _write_run(root, "lora-s0", "lora", 0, {t: (rng.random(DOCS) < 0.5).astype(float) for t in TASKS},
               text_sha256="cd" * 32)
    md = _report(root, tmp_path)
    assert "| lors | pruned only | 1/1 |" not in md  # not partly paired ...
    assert ("| wanda · unstructured · 50% | lors | pruned only | task arc_easy: different documents (runs/lors-s0 "
            "has 300, runs/none-s0 has 800, 300 in common) |" in md)  # ... but listed with what differs
    lora = _row(md, "| lora | pruned only | 1/1 | 1600 |")
    assert lora.split("|")[-3].strip() == "—"  # no Δ ppl: another text
    assert ("Δ ppl not paired: lora vs pruned only (wanda · unstructured · 50%): different perplexity text "
            "(runs/lora-s0 vs runs/none-s0: text_sha256 differs)." in md)


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorsbench.report: error: ") and err.count("\n") == 1, err
    return err


def test_clear_errors(sweep, tmp_path, capsys):
    out = ["--name", "x", "--out", str(tmp_path / "out")]
    err = _error(capsys, [str(sweep), *out, "--reference", "lorz"])
    assert "--reference 'lorz'" in err and "valid here: dense, none, lora, lors, sqft" in err
    assert "distinct names" in _error(capsys, [str(sweep), *out, "--reference", "lora,,none"])
    assert "--resamples must be at least 100, got 5" in _error(capsys, [str(sweep), *out, "--resamples", "5"])
    bad = tmp_path / "bad"
    _write_run(bad, "none-s0", "none", 0, {"boolq": np.ones(3)})
    with gzip.open(bad / "none-s0" / "samples.jsonl.gz", "wt") as handle:
        handle.write('{"task": "boolq", "doc_id": 0, "acc": 1, "margin": 0.1}\n{"task": "boolq", "doc_id": 1}\n')
    _write_run(bad, "lora-s0", "lora", 0, {"boolq": np.ones(3)})
    assert f"{bad / 'none-s0' / 'samples.jsonl.gz'}, line 2: missing key 'acc'" in _error(capsys, [str(bad), *out])
    assert not (tmp_path / "out").exists()


def test_write_report_api_takes_options(sweep, tmp_path):
    folder = write_report([sweep], "api", tmp_path, StatsOptions(references=("none",), resamples=200, seed=3))
    md = (folder / "report.md").read_text()
    assert "200 resamples, seed 3" in md and "| lors | lora |" not in md and "† pruned only" in md


def test_reads_what_the_pipeline_writes(tmp_path):
    """The report reads the files the pipeline's own writers produce (lm-eval samples -> samples.jsonl.gz, the
    perplexity windows), and pairs them."""
    from lorsbench.evaluation.lm_eval_runner import SAMPLES_FILE, per_example_rows, write_samples
    from lorsbench.evaluation.perplexity import PerplexityResult
    from lorsbench.pipeline import PPL_WINDOWS
    from lorsbench.records import write_json_atomic
    from lorsbench.report.samples import load_run

    def lm_eval_sample(position: int, right: bool) -> dict:  # the fields of lm-eval's logged samples used
        gold = position % 2
        logliks = [-1.0, -2.0] if (gold == 0) == right else [-2.0, -1.0]
        return {"doc_id": position, "target": gold, "filtered_resps": [[ll, False] for ll in logliks],
                "acc": float(right), "acc_norm": float(right), "doc": {}}

    for name, method, shift in (("a", "none", 0), ("b", "lora", 1)):
        folder = tmp_path / "runs" / name
        rows = per_example_rows([lm_eval_sample(i, (i + shift) % 3 != 0) for i in range(30)], "arc_easy",
                                tuple(range(100, 130)))
        write_samples(folder / SAMPLES_FILE, rows)
        windows = PerplexityResult(8.0, 40, 10, 10, "pydoc", text_sha256="ef" * 32,
                                   window_nll_sum=(20.0 + shift, 21.0, 22.0, 19.0), window_tokens=(10,) * 4)
        write_json_atomic(folder / PPL_WINDOWS, windows.windows_json())
        record = {"schema_version": 1, "status": "success", "run_name": name, "model": "m", "pruner": "wanda",
                  "pattern": "unstructured", "target_sparsity": 0.5, "method": method, "seed": 0,
                  "weights": "pretrained", "tasks": {"arc_easy": {"acc": sum(r["acc"] for r in rows) / 30}},
                  "samples_file": SAMPLES_FILE, "perplexity_windows_file": PPL_WINDOWS}
        write_json_atomic(folder / "run.json", record)
        run = load_run({**record, "run_dir": name}, folder, ["arc_easy"])
        assert run.tasks["arc_easy"].doc_ids.tolist() == list(range(100, 130))
        assert run.tasks["arc_easy"].acc.tolist() == [float((i + shift) % 3 != 0) for i in range(30)]
        assert set(np.abs(run.tasks["arc_easy"].margin)) == {1.0} and run.windows.tokens.tolist() == [10] * 4
    md = _report(tmp_path / "runs", tmp_path)
    assert _row(md, "| lora | pruned only | 1/1 | 30 |")
