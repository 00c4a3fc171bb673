"""Online models: River pipelines, predict-then-learn training, progressive metrics, drift, snapshots.

A :class:`OnlineModel` is what the single trainer owns: for each labelled example it first predicts (that
prediction feeds the progressive metrics, so they measure the model on data it has not seen), then learns. Its
:meth:`~OnlineModel.snapshot` is what workers score with.

>>> model = OnlineModel("intent", ["visits", "quiet_days"])
>>> for i in range(400):
...     visits = i % 10
...     drift = model.learn([visits, 10 - visits], int(visits >= 5), served=0.5, baseline=0.5)
>>> model.learned, model.metrics.auc.value() > 0.9
(400, True)
>>> snapshot = model.snapshot(version=1, training_offset=399, created_ms=0)
>>> round(snapshot.predict([9, 1]), 2) > 0.8 > 0.2 > round(snapshot.predict([1, 9]), 2)
True
>>> restored = load_snapshot(dump_snapshot(snapshot))
>>> restored.version, restored.predict([9, 1]) == snapshot.predict([9, 1])
(1, True)
"""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from river import compose, drift, linear_model, optim, preprocessing

AUC_BINS = 1000


class BinnedAUC:
    """ROC AUC from score histograms: exact up to 1/``bins`` score resolution, bounded memory, picklable.

    >>> auc = BinnedAUC()
    >>> for score, label in [(0.9, 1), (0.8, 1), (0.3, 0), (0.85, 0), (0.1, 0)]:
    ...     auc.update(score, label)
    >>> round(auc.value(), 4)
    0.8333
    """

    def __init__(self, bins: int = AUC_BINS) -> None:
        self.bins = bins
        self.positives = [0] * bins
        self.negatives = [0] * bins

    def update(self, score: float, label: int) -> None:
        index = min(self.bins - 1, max(0, int(score * self.bins)))
        (self.positives if label else self.negatives)[index] += 1

    def value(self) -> float:
        """Probability that a random positive scores above a random negative (ties count half); NaN if undefined."""
        total_pos, total_neg = sum(self.positives), sum(self.negatives)
        if not total_pos or not total_neg:
            return math.nan
        below = 0  # negatives in lower bins
        wins = 0.0
        for pos, neg in zip(self.positives, self.negatives, strict=True):
            wins += pos * (below + neg / 2)
            below += neg
        return wins / (total_pos * total_neg)

    @property
    def count(self) -> int:
        return sum(self.positives) + sum(self.negatives)


class Calibration:
    """Predicted vs observed rate in ten score bins, and the expected calibration error (ECE)."""

    def __init__(self, bins: int = 10) -> None:
        self.bins = bins
        self.count = [0] * bins
        self.predicted = [0.0] * bins
        self.observed = [0] * bins

    def update(self, score: float, label: int) -> None:
        index = min(self.bins - 1, max(0, int(score * self.bins)))
        self.count[index] += 1
        self.predicted[index] += score
        self.observed[index] += label

    def table(self) -> list[dict[str, float]]:
        return [
            {"bin": i / self.bins, "n": n, "predicted": round(p / n, 4), "observed": round(o / n, 4)}
            for i, (n, p, o) in enumerate(zip(self.count, self.predicted, self.observed, strict=True))
            if n
        ]

    def ece(self) -> float:
        total = sum(self.count)
        if not total:
            return math.nan
        return sum(abs(p - o) for n, p, o in zip(self.count, self.predicted, self.observed, strict=True) if n) / total


@dataclass
class ProgressiveMetrics:
    """Predict-then-learn metrics of the model, of what was served at the time, and of the naive baseline."""

    auc: BinnedAUC = field(default_factory=BinnedAUC)
    served_auc: BinnedAUC = field(default_factory=BinnedAUC)
    baseline_auc: BinnedAUC = field(default_factory=BinnedAUC)
    calibration: Calibration = field(default_factory=Calibration)
    log_loss_sum: float = 0.0
    examples: int = 0
    positives: int = 0
    drifts: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)  # (examples, AUC of the last window)
    _window: BinnedAUC = field(default_factory=lambda: BinnedAUC(200))

    def update(self, predicted: float, label: int, served: float, baseline: float, window: int = 500) -> float:
        """Record one example; returns its log loss (what the drift detector watches)."""
        p = min(1 - 1e-7, max(1e-7, predicted))
        loss = -math.log(p if label else 1 - p)
        self.log_loss_sum += loss
        self.examples += 1
        self.positives += label
        self.auc.update(predicted, label)
        self.served_auc.update(served, label)
        self.baseline_auc.update(baseline, label)
        self.calibration.update(predicted, label)
        self._window.update(predicted, label)
        if self._window.count >= window:
            self.curve.append((self.examples, round(self._window.value(), 4)))
            self._window = BinnedAUC(200)
        return loss

    def summary(self) -> dict[str, Any]:
        def clean(value: float) -> float | None:
            return None if math.isnan(value) else round(value, 4)

        return {
            "examples": self.examples,
            "positive_rate": clean(self.positives / self.examples if self.examples else math.nan),
            "auc": clean(self.auc.value()),
            "served_auc": clean(self.served_auc.value()),
            "baseline_auc": clean(self.baseline_auc.value()),
            "log_loss": clean(self.log_loss_sum / self.examples if self.examples else math.nan),
            "calibration_error": clean(self.calibration.ece()),
            "drifts": self.drifts,
            "auc_curve": list(self.curve),
        }


def make_pipeline() -> compose.Pipeline:
    """Scaler + logistic regression: simple, fast to score, and it won our evaluation against deeper options."""
    return compose.Pipeline(
        preprocessing.StandardScaler(),
        linear_model.LogisticRegression(optimizer=optim.SGD(0.02), l2=1e-4),
    )


@dataclass
class ModelSnapshot:
    """A versioned, immutable copy of a model that workers score with."""

    name: str
    version: int
    feature_names: list[str]
    pipeline: compose.Pipeline
    learned: int
    training_offset: int  # the last training-topic offset this snapshot has learned from
    created_ms: int
    metrics: dict[str, Any]
    checkpoint: bytes = b""  # the trainer's full state (model, metrics, drift detector), to resume from

    def predict(self, vector: Sequence[float]) -> float:
        x = dict(zip(self.feature_names, vector, strict=True))
        return float(self.pipeline.predict_proba_one(x).get(True, 0.0))


@dataclass
class OnlineModel:
    """The trainer's live model: predict, record metrics, watch for drift, then learn."""

    name: str
    feature_names: list[str]
    pipeline: compose.Pipeline = field(default_factory=make_pipeline)
    metrics: ProgressiveMetrics = field(default_factory=ProgressiveMetrics)
    detector: drift.ADWIN = field(default_factory=lambda: drift.ADWIN(delta=0.002))
    learned: int = 0
    version: int = 0

    def learn(self, vector: Sequence[float], label: int, served: float, baseline: float) -> bool:
        """Predict-then-learn one example; True if the drift detector fired on it."""
        x = dict(zip(self.feature_names, vector, strict=True))
        predicted = float(self.pipeline.predict_proba_one(x).get(True, 0.0)) if self.learned else 0.5
        loss = self.metrics.update(predicted, label, served, baseline)
        self.detector.update(loss)
        # ADWIN flags any change; only a worse error is drift worth raising (an improving model is not)
        mean_loss = self.metrics.log_loss_sum / self.metrics.examples
        drifted = bool(self.detector.drift_detected) and self.learned > 100 and self.detector.estimation > mean_loss
        if drifted:
            self.metrics.drifts += 1
        self.pipeline.learn_one(x, bool(label))
        self.learned += 1
        return drifted

    def snapshot(self, version: int, training_offset: int, created_ms: int) -> ModelSnapshot:
        self.version = version
        return ModelSnapshot(
            self.name, version, list(self.feature_names), copy.deepcopy(self.pipeline), self.learned,
            training_offset, created_ms, self.metrics.summary(), self.checkpoint(),
        )  # fmt: skip

    @classmethod
    def resume(cls, state: bytes) -> OnlineModel:
        """The trainer's own checkpoint (model, metrics, detector), as written by :meth:`checkpoint`."""
        model = pickle.loads(state)
        if not isinstance(model, cls):
            raise TypeError("not an OnlineModel checkpoint")
        return model

    def checkpoint(self) -> bytes:
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)


def dump_snapshot(snapshot: ModelSnapshot) -> bytes:
    """Snapshots travel as pickles: the models topic must be writable by the trainer only (Kafka ACLs)."""
    return pickle.dumps(snapshot, protocol=pickle.HIGHEST_PROTOCOL)


def load_snapshot(data: bytes) -> ModelSnapshot:
    snapshot = pickle.loads(data)
    if not isinstance(snapshot, ModelSnapshot):
        raise TypeError("not a ModelSnapshot")
    return snapshot
