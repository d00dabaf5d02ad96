"""The numbers users need before believing an eval: bootstrap intervals, length control, Bradley-Terry ratings.

Pure functions on numpy arrays; `summarize`, `ratings` and `plot` turn judgment items into these arrays.

- Bootstrap: questions are the resampling unit (a question's turns and both answer orders stay together, since
  they are not independent), `resample_counts` draws how often each question appears in each resample, and every
  statistic is a weighted sum over items, so one matrix product evaluates all resamples. Intervals are
  percentile intervals (95% by default), seeded so a rerun prints the same numbers.
- Length-controlled preference, as AlpacaEval 2's `length_controlled_minimal` GLM: a logistic regression of the
  preference for model 2 (1 win, 0.5 tie, 0 loss; a soft label) on a constant and tanh(length difference / its
  standard deviation), both L1-penalised, no separate intercept; the penalty strength is chosen from
  sklearn's default grid (C in logspace(-4, 4, 10)) by 5-fold cross-validation over questions, scored by held-out
  log loss, as AlpacaEval's `LogisticRegressionCV(penalty="l1", solver="liblinear")` does. A judge with no length
  bias gets a slope of zero and the raw preference back, instead of a noisy slope extrapolated. The
  length-controlled value is the fitted preference at length difference 0. Bootstrap resamples refit with the
  strength chosen on the observed data.
- Bradley-Terry (Chatbot Arena style): P(i beats j) = 1 / (1 + 10^((R_j - R_i) / 400)), fitted by Newton's
  method on pairwise outcomes (a tie is half a win each), with a weak Gaussian prior that keeps a model that wins
  every battle finite; ratings are centred on 1000.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
ELO_SCALE = 400.0 / math.log(10.0)  # natural-log strength -> Elo points
ELO_CENTER = 1000.0
BT_PRIOR = 0.05  # Gaussian prior precision on strengths (natural-log units): sd ~ 780 Elo
LC_STRENGTHS = np.logspace(-4, 4, 10)  # C grid: sklearn LogisticRegressionCV(Cs=10), which AlpacaEval uses
LC_FOLDS = 5  # AlpacaEval's n_splits


def resample_counts(n_clusters: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n_clusters) counts: how often each cluster (question) is drawn in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    if n_clusters == 0:
        return np.zeros((resamples, 0))
    return rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=resamples).astype(float)


def cluster_weights(clusters: list, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n_items) bootstrap weights for items labelled by cluster (e.g. question_id)."""
    order = {c: i for i, c in enumerate(dict.fromkeys(clusters))}
    counts = resample_counts(len(order), resamples, seed)
    return counts[:, [order[c] for c in clusters]]


def interval(samples: np.ndarray, level: float = DEFAULT_LEVEL) -> list[float] | None:
    """Percentile interval [low, high] of bootstrap samples (NaN samples ignored); None if none are finite."""
    finite = np.asarray(samples, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return [round(float(low), 4), round(float(high), 4)]


def weighted_ratio(weights: np.ndarray, numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """sum(w * numerator) / sum(w * denominator) per row of `weights` (NaN where the denominator is 0)."""
    top, bottom = weights @ numerator, weights @ denominator
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(bottom != 0, top / np.where(bottom != 0, bottom, 1), np.nan)


def length_feature(length_diff: np.ndarray) -> np.ndarray:
    """tanh(diff / std(diff)): AlpacaEval 2's bounded length term (zeros when every difference is equal)."""
    diff = np.asarray(length_diff, dtype=float)
    scale = diff.std()
    return np.tanh(diff / scale) if scale > 0 else np.zeros_like(diff)


def length_controlled_preference(preference: np.ndarray, length_diff: np.ndarray,
                                 weights: np.ndarray | None = None, groups: list | None = None) -> np.ndarray:
    """Preference for model 2 at equal length, per row of `weights` (one row: the data as observed).

    Args:
        preference: (n,) 1 model 2 won, 0.5 tie, 0 model 1 won.
        length_diff: (n,) length of model 2's answer minus model 1's.
        weights: (R, n) bootstrap weights; None means one row of ones.
        groups: (n,) the question of each item: cross-validation folds keep a question's items together
            (default: every item its own question).

    Returns:
        (R,) sigmoid(constant term) of the L1-penalised logistic regression (module docstring).
    """
    y = np.asarray(preference, dtype=float)
    features = np.stack([np.ones_like(y), length_feature(length_diff)], axis=1)  # (n, 2)
    strength = choose_lc_strength(y, features, list(range(y.size)) if groups is None else groups)
    w = np.ones((1, y.size)) if weights is None else np.asarray(weights, dtype=float)
    beta = fit_l1_logistic(y, features, w, np.full(w.shape[0], strength))
    return _sigmoid(beta[:, 0])


def question_folds(groups: list, n_folds: int = LC_FOLDS) -> np.ndarray:
    """(n,) fold of each item, a question's items in one fold, assigned as sklearn's GroupKFold does (AlpacaEval's
    splitter): questions in sorted order, the largest first, each to the fold with the fewest items so far."""
    keys = sorted(set(groups), key=lambda g: (isinstance(g, str), g))  # ids: numbers in order, then strings
    index = {g: i for i, g in enumerate(keys)}
    group_of = np.array([index[g] for g in groups])
    sizes = np.bincount(group_of, minlength=len(keys))
    fold_of_group, load = np.zeros(len(keys), dtype=int), np.zeros(n_folds)
    for g in np.argsort(sizes)[::-1]:
        lightest = int(np.argmin(load))
        load[lightest] += sizes[g]
        fold_of_group[g] = lightest
    return fold_of_group[group_of]


def choose_lc_strength(y: np.ndarray, features: np.ndarray, groups: list) -> float:
    """The C of `LC_STRENGTHS` with the lowest held-out log loss, averaged over folds of questions (the
    smallest such C on ties, as sklearn picks); the largest C when there are fewer than two questions."""
    n_folds = min(LC_FOLDS, len(set(groups)))
    if n_folds < 2:
        return float(LC_STRENGTHS[-1])
    folds = question_folds(groups, n_folds)
    train = np.stack([folds != k for k in range(n_folds)]).astype(float)  # (K, n)
    rows = np.repeat(train, len(LC_STRENGTHS), axis=0)  # (K*C, n): fold-major
    beta = fit_l1_logistic(y, features, rows, np.tile(LC_STRENGTHS, n_folds))
    p = np.clip(_sigmoid(beta @ features.T), 1e-15, 1 - 1e-15)  # (K*C, n)
    loss = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    held_out = 1.0 - rows
    fold_loss = (loss * held_out).sum(1) / held_out.sum(1)  # (K*C,)
    mean_loss = fold_loss.reshape(n_folds, len(LC_STRENGTHS)).mean(0)  # (C,)
    return float(LC_STRENGTHS[int(np.argmin(np.round(mean_loss, 12)))])


def fit_l1_logistic(y: np.ndarray, features: np.ndarray, weights: np.ndarray, strength: np.ndarray,
                    iterations: int = 200) -> np.ndarray:
    """Minimise C * sum_i w_i * cross_entropy(y_i, sigmoid(x_i . beta)) + |beta|_1 for each row of `weights`.

    liblinear's L1 objective with soft labels (AlpacaEval duplicates each row with label 1 weighted y and label 0
    weighted 1 - y, which is the same sum). Proximal Newton: each step minimises the quadratic model plus the L1
    term by coordinate descent, then halves the step where the objective would not fall.

    Args:
        y: (n,) targets in [0, 1]. features: (n, k). weights: (R, n). strength: (R,) the C of each row.

    Returns:
        (R, k) coefficients.
    """
    rows, k = weights.shape[0], features.shape[1]
    lam = (1.0 / np.asarray(strength, dtype=float))[:, None]  # (R, 1): the L1 weight with the loss unscaled
    beta = np.zeros((rows, k))

    def objective(b):
        z = b @ features.T  # (R, n)
        ce = np.logaddexp(0, z) - y * z  # cross-entropy of sigmoid(z) against y
        return (weights * ce).sum(1) + (lam * np.abs(b)).sum(1)

    current = objective(beta)
    for _ in range(iterations):
        p = _sigmoid(beta @ features.T)  # (R, n)
        grad = (weights * (p - y)) @ features  # (R, k)
        hess = np.einsum("rn,ni,nj->rij", weights * p * (1 - p), features, features) + 1e-12 * np.eye(k)
        step = np.zeros_like(beta)
        for _ in range(20):  # coordinate descent on the quadratic model + L1
            for j in range(k):
                h = hess[:, j, j]
                a = grad[:, j] + (hess[:, j, :] * step).sum(1) - h * step[:, j]
                target = h * beta[:, j] - a
                new = np.sign(target) * np.maximum(np.abs(target) - lam[:, 0], 0.0) / h
                step[:, j] = new - beta[:, j]
        scale = np.ones((rows, 1))
        trial = objective(beta + step)
        for _ in range(30):
            worse = trial > current + 1e-12
            if not worse.any():
                break
            scale[worse] *= 0.5
            trial = objective(beta + scale * step)
        moved = scale * step
        moved[trial > current + 1e-12] = 0.0
        beta += moved
        done = np.abs(current - np.minimum(trial, current)).max() < 1e-12 * (1 + np.abs(current).max())
        current = np.minimum(trial, current)
        if done or np.abs(moved).max() < 1e-10:
            break
    return beta


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


@dataclass(frozen=True)
class Battles:
    """Pairwise outcomes aggregated per model pair: `wins[k]` of `games[k]` went to `first[k]` over `second[k]`."""

    first: np.ndarray
    second: np.ndarray
    wins: np.ndarray
    games: np.ndarray


def bradley_terry(battles: Battles, n_models: int, iterations: int = 100) -> np.ndarray:
    """Elo-scale ratings (mean 1000) maximizing the Bradley-Terry likelihood of the battles (module docstring)."""
    theta = np.zeros(n_models)
    rows = np.arange(len(battles.first))
    incidence = np.zeros((len(rows), n_models))  # (P, M): +1 first, -1 second
    incidence[rows, battles.first] = 1.0
    incidence[rows, battles.second] = -1.0
    for _ in range(iterations):
        p = _sigmoid(incidence @ theta)  # (P,) P(first beats second)
        grad = incidence.T @ (battles.wins - battles.games * p) - BT_PRIOR * theta
        hessian = (incidence.T * (battles.games * p * (1 - p))) @ incidence + BT_PRIOR * np.eye(n_models)
        step = np.linalg.solve(hessian, grad)
        theta += step
        if np.abs(step).max() < 1e-10:
            break
    theta -= theta.mean()
    return ELO_CENTER + ELO_SCALE * theta


def relative_log_quality(first: np.ndarray, second: np.ndarray, log_ratio: np.ndarray, n_models: int,
                         reference: int) -> np.ndarray:
    """Least-squares log quality q (q[reference] = 0) with q[second] - q[first] ≈ log_ratio for each comparison.

    Args:
        first, second: (C,) model indices of each comparison.
        log_ratio: (R, C) log(total of second / total of first), one row per resample (NaN: unusable).

    Returns:
        (R, M) log quality relative to the reference; NaN for models the comparisons do not connect to it.
    """
    log_ratio = np.atleast_2d(log_ratio)
    out = np.full((log_ratio.shape[0], n_models), np.nan)
    for r, row in enumerate(log_ratio):
        usable = np.isfinite(row)
        connected = _connected(first[usable], second[usable], n_models, reference)
        free = [m for m in connected if m != reference]
        out[r, reference] = 0.0
        if not free:
            continue
        design = np.zeros((int(usable.sum()), len(free)))
        column = {m: i for i, m in enumerate(free)}
        for k, (a, b) in enumerate(zip(first[usable], second[usable])):
            if b in column:
                design[k, column[b]] += 1.0
            if a in column:
                design[k, column[a]] -= 1.0
        solution = np.linalg.lstsq(design, row[usable], rcond=None)[0]
        out[r, free] = solution
    return out


def _connected(first: np.ndarray, second: np.ndarray, n_models: int, start: int) -> list[int]:
    """Models linked to `start` through comparisons (breadth first)."""
    neighbours: dict[int, set[int]] = {m: set() for m in range(n_models)}
    for a, b in zip(first, second):
        neighbours[int(a)].add(int(b))
        neighbours[int(b)].add(int(a))
    seen, frontier = {start}, [start]
    while frontier:
        nxt = [n for m in frontier for n in neighbours[m] if n not in seen]
        seen.update(nxt)
        frontier = nxt
    return sorted(seen)
