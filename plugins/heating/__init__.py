"""The heating plugin: hy/gw heating gateways over MQTT and the CJ/T 188 meters behind them.

Entry point ``heating = gatewayd.plugins.heating:HeatingPlugin``; see README.md in this folder.
"""

from .config import HeatingConfig
from .plugin import BrokerUnavailable, HeatingPlugin
from .simulator import HeatingSimulator

HeatingPlugin.simulator = HeatingSimulator

__all__ = ["BrokerUnavailable", "HeatingConfig", "HeatingPlugin", "HeatingSimulator"]
