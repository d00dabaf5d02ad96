"""Statistics on synthetic judgments with a known truth: interval coverage, Bradley-Terry recovery, length control."""
import numpy as np
import pytest

from ds_vicuna.eval.judgments import FIRST, SECOND, Game, JudgmentFile, PairItem, SingleItem
from ds_vicuna.eval.ratings import rate
from ds_vicuna.eval.statistics import (ELO_SCALE, length_controlled_preference, relative_log_quality)
from ds_vicuna.eval.summarize import Options, summarize_pair, summarize_singles

TIE = "tie"


def pair_item(qid, winner, score_1=None, score_2=None, lengths=None, model_1="m1", model_2="m2"):
    """One question judged in both orders with the same outcome."""
    games = [Game(FIRST, winner, score_1, score_2), Game(SECOND, winner, score_1, score_2)]
    return PairItem(qid, 1, "generic", model_1, model_2, games, lengths)


def test_bootstrap_intervals_cover_the_truth_at_about_the_stated_rate():
    rng = np.random.default_rng(7)
    trials, n, p_win_2 = 200, 80, 0.6
    hits = {"win_rate_2": 0, "score_1": 0, "single_mean": 0}
    for trial in range(trials):
        wins_2 = rng.random(n) < p_win_2
        scores_1 = rng.integers(4, 11, size=n)  # uniform 4..10: expected total 7 * n
        items = [pair_item(q, SECOND if w else FIRST, float(s), float(s) - 1 if w else float(s) + 1)
                 for q, (w, s) in enumerate(zip(wins_2, scores_1))]
        summary = summarize_pair(items, JudgmentFile("synthetic"), False, Options(resamples=400, seed=trial))
        low, high = summary["ci"]["win_rate_2"]
        hits["win_rate_2"] += low <= p_win_2 <= high
        low, high = summary["ci"]["score_1"]
        hits["score_1"] += low <= 7 * n <= high
        grades = [SingleItem(q, 1, "generic", "m", float(s)) for q, s in enumerate(scores_1)]
        low, high = summarize_singles(grades, JudgmentFile("synthetic"), False,
                                      Options(resamples=400, seed=trial))["models"]["m"]["ci"]["mean"]
        hits["single_mean"] += low <= 7 <= high
    coverage = {k: v / trials for k, v in hits.items()}
    # 95% intervals; 200 trials give a binomial sd of 1.5 points; percentile intervals run a little narrow at n=80
    assert all(0.88 <= c <= 0.99 for c in coverage.values()), coverage


def test_bradley_terry_recovers_known_ratings_from_simulated_battles():
    truth = {"a": 1200.0, "b": 1100.0, "c": 1000.0, "d": 900.0, "e": 800.0}  # mean 1000, as the fit centres
    rng = np.random.default_rng(3)
    names = list(truth)
    items = []
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            p_first = 1 / (1 + 10 ** ((truth[second] - truth[first]) / 400))
            for q in range(200):
                winner = FIRST if rng.random() < p_first else SECOND
                items.append(pair_item(q, winner, model_1=first, model_2=second))
    loaded = JudgmentFile("simulated", pairs=items)
    result = rate([loaded], Options(resamples=200, seed=1))
    assert list(result["models"]) == names  # ranked best first
    errors = {m: result["models"][m]["rating"] - truth[m] for m in names}
    assert all(abs(e) < 40 for e in errors.values()), errors
    covered = sum(r["ci"][0] <= truth[m] <= r["ci"][1] for m, r in result["models"].items())
    assert covered >= 4, result["models"]
    assert result["battles"] == 2000 and result["models"]["a"]["battles"] == 800


def test_ties_count_half_and_a_model_that_always_wins_stays_finite():
    items = [pair_item(q, FIRST, model_1="strong", model_2="weak") for q in range(30)]
    items += [pair_item(q, TIE, model_1="weak", model_2="other") for q in range(30)]
    result = rate([JudgmentFile("x", pairs=items)], Options(resamples=50))
    ratings = {m: r["rating"] for m, r in result["models"].items()}
    assert np.isfinite(list(ratings.values())).all()
    # the weak prior pulls a little
    assert ratings["strong"] > ratings["weak"] and abs(ratings["weak"] - ratings["other"]) < 5
    assert result["models"]["weak"]["ties"] == 30 and result["models"]["weak"]["losses"] == 30


def test_disconnected_models_have_no_common_scale():
    items = [pair_item(1, FIRST, model_1="a", model_2="b"), pair_item(1, FIRST, model_1="c", model_2="d")]
    with pytest.raises(ValueError, match="separate groups"):
        rate([JudgmentFile("x", pairs=items)], Options(resamples=10))


def test_length_control_removes_a_pure_length_preference():
    rng = np.random.default_rng(11)
    n = 600
    diff = rng.normal(300, 400, size=n)  # model 2 is usually longer
    x = np.tanh(diff / diff.std())
    # the judge prefers the longer answer only: at equal length, a coin flip (true LC preference 0.5)
    preference = (rng.random(n) < 1 / (1 + np.exp(-2.0 * x))).astype(float)
    raw = preference.mean()
    lc = float(length_controlled_preference(preference, diff)[0])
    assert raw > 0.65 and abs(lc - 0.5) < 0.07, (raw, lc)


def test_length_controlled_preference_in_summaries():
    rng = np.random.default_rng(5)
    items = []
    for q in range(200):
        longer = rng.random() < 0.8
        lengths = (500, 900) if longer else (900, 500)
        wins_2 = rng.random() < (0.8 if longer else 0.2)  # verbosity wins
        items.append(pair_item(q, SECOND if wins_2 else FIRST, lengths=lengths))
    summary = summarize_pair(items, JudgmentFile("x"), False, Options(resamples=300))
    assert summary["preference_2"] > 0.6
    assert abs(summary["lc_preference_2"] - 0.5) < 0.08
    low, high = summary["ci"]["lc_preference_2"]
    assert low < summary["lc_preference_2"] < high
    assert summary["length"] == {"m1": {"n": 200, "mean_chars": pytest.approx(summary["length"]["m1"]["mean_chars"]),
                                        "median_chars": 500.0}, "m2": summary["length"]["m2"]}
    assert summary["length"]["m2"]["median_chars"] == 900.0


def test_relative_quality_least_squares_is_exact_on_consistent_ratios():
    # a->b x2, b->c x1.5, a->c x3 (consistent): qualities relative to a are 1, 2, 3
    first, second = np.array([0, 1, 0]), np.array([1, 2, 2])
    log_ratio = np.log([[2.0, 1.5, 3.0]])
    quality = np.exp(relative_log_quality(first, second, log_ratio, 3, reference=0)[0])
    assert quality == pytest.approx([1.0, 2.0, 3.0])
    # a model no comparison reaches stays NaN
    assert np.isnan(relative_log_quality(first[:1], second[:1], log_ratio[:, :1], 3, reference=0)[0, 2])


def test_elo_scale():
    # 400 Elo points are a factor of 10 in odds
    assert ELO_SCALE * np.log(10) == pytest.approx(400)
