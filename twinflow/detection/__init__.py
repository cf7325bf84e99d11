"""Online anomaly detection per entity: features, River scorers, a decision rule.

Pure code: no I/O, no Bytewax, no Kafka, so the flow and the offline ``replay`` share it.

>>> from twinflow.detection import DetectorConfig, EntityDetector
>>> detector = EntityDetector(DetectorConfig())
>>> detector.process({"flow.mean": 180.0}).warming_up
True
"""

from twinflow.detection.alarms import AlarmPolicy, AlarmTracker
from twinflow.detection.detector import (
    DEFAULT_FLOORS,
    Detection,
    DetectorConfig,
    EntityDetector,
    Kind,
)
from twinflow.detection.features import FEATURES, feature_vector, split_feature
from twinflow.detection.monitor import EntityMonitor, Verdict
from twinflow.detection.scorers import (
    Aggregate,
    FeatureDeviation,
    HalfSpaceTreesScorer,
    Scorer,
    Standardizer,
    ZScoreScorer,
)
from twinflow.detection.smoothing import FeatureSmoother
from twinflow.detection.thresholds import Decision, DecisionRule, Persistence, ScoreThreshold

__all__ = [
    "DEFAULT_FLOORS",
    "FEATURES",
    "Aggregate",
    "AlarmPolicy",
    "AlarmTracker",
    "Decision",
    "DecisionRule",
    "Detection",
    "DetectorConfig",
    "EntityDetector",
    "EntityMonitor",
    "FeatureDeviation",
    "FeatureSmoother",
    "HalfSpaceTreesScorer",
    "Kind",
    "Persistence",
    "ScoreThreshold",
    "Scorer",
    "Standardizer",
    "Verdict",
    "ZScoreScorer",
    "feature_vector",
    "split_feature",
]
