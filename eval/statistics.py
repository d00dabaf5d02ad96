"""The numbers users need before believing an eval: bootstrap intervals, length control, Bradley-Terry ratings.

Pure functions on numpy arrays; `summarize`, `ratings` and `plot` turn judgment items into these arrays.

- Bootstrap: questions are the resampling unit (a question's turns and both answer orders stay together, since
  they are not independent), `resample_counts` draws how often each question appears in each resample, and every
  statistic is a weighted sum over items, so one matrix product evaluates all resamples. Intervals are
  percentile intervals (95% by default), seeded so a rerun prints the same numbers.
- Length-controlled preference (AlpacaEval 2 style, without its per-instruction term): a logistic regression of
  the preference for model 2 (1 win, 0.5 tie, 0 loss) on tanh(length difference / its standard deviation);
  the length-controlled value is the fitted preference at length difference 0.
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
LC_PRIOR = 1e-3


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
                                 weights: np.ndarray | None = None, iterations: int = 50) -> np.ndarray:
    """Preference for model 2 at equal length, per row of `weights` (one row: the data as observed).

    Args:
        preference: (n,) 1 model 2 won, 0.5 tie, 0 model 1 won.
        length_diff: (n,) length of model 2's answer minus model 1's.
        weights: (R, n) bootstrap weights; None means one row of ones.

    Returns:
        (R,) sigmoid(intercept) of the fitted logistic regression.
    """
    y = np.asarray(preference, dtype=float)
    x = length_feature(length_diff)
    w = np.ones((1, y.size)) if weights is None else np.asarray(weights, dtype=float)
    beta = np.zeros((w.shape[0], 2))  # (R, 2): intercept, length slope
    for _ in range(iterations):
        p = _sigmoid(beta[:, :1] + beta[:, 1:] * x)  # (R, n)
        residual = w * (y - p)
        grad = np.stack([residual.sum(1), residual @ x], axis=1) - LC_PRIOR * beta  # (R, 2)
        curvature = w * p * (1 - p)
        h00, h01, h11 = curvature.sum(1) + LC_PRIOR, curvature @ x, curvature @ (x * x) + LC_PRIOR
        det = h00 * h11 - h01 * h01
        step = np.stack([(h11 * grad[:, 0] - h01 * grad[:, 1]) / det,
                         (h00 * grad[:, 1] - h01 * grad[:, 0]) / det], axis=1)
        beta += step
        if np.abs(step).max() < 1e-10:
            break
    return _sigmoid(beta[:, 0])


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
