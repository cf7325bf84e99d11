"""Predictive maintenance: per entity and sensor, when its trend reaches its alarm limit.

Pure code: no I/O, no Bytewax, no Kafka; the flow and the evaluation harness share it.
"""

from twinflow.maintenance.monitor import MaintenanceConfig, MaintenanceMonitor, MaintenanceVerdict
from twinflow.maintenance.trend import Trends, fit, time_to_limit

__all__ = [
    "MaintenanceConfig",
    "MaintenanceMonitor",
    "MaintenanceVerdict",
    "Trends",
    "fit",
    "time_to_limit",
]
