"""Online anomaly detection per entity: features, cycles, z-scores, a decision rule, alarms.

Pure code: no I/O, no Bytewax, no Kafka, so the flow and the offline ``replay`` share it.

>>> from twinflow.detection import DetectorConfig, EntityDetector
>>> detector = EntityDetector(DetectorConfig())
>>> detector.process({"flow.mean": 180.0}).warming_up
True
"""

from twinflow.detection.alarms import AlarmPolicy, AlarmTracker
from twinflow.detection.detector import MODEL_NAME, Detection, DetectorConfig, EntityDetector
from twinflow.detection.features import FEATURES, feature_vector, split_feature
from twinflow.detection.monitor import EntityMonitor, Verdict
from twinflow.detection.seasonal import DAY_MS, DEFAULT_PERIODS, WEEK_MS, Period, Seasonality
from twinflow.detection.smoothing import Smoother
from twinflow.detection.thresholds import Decision, DecisionRule, Persistence, ScoreThreshold
from twinflow.detection.zscores import ZScores

__all__ = [
    "DAY_MS",
    "DEFAULT_PERIODS",
    "FEATURES",
    "MODEL_NAME",
    "WEEK_MS",
    "AlarmPolicy",
    "AlarmTracker",
    "Decision",
    "DecisionRule",
    "Detection",
    "DetectorConfig",
    "EntityDetector",
    "EntityMonitor",
    "Period",
    "Persistence",
    "ScoreThreshold",
    "Seasonality",
    "Smoother",
    "Verdict",
    "ZScores",
    "feature_vector",
    "split_feature",
]
