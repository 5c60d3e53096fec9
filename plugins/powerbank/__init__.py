"""Power-bank rental cabinets (``type: powerbank``): plugin, TCP server, flows and simulator.

See README.md in this folder for the configuration, events, commands and flows.
"""

from .plugin import PowerbankConfig, PowerbankPlugin
from .simulator import PowerbankSimulator

PowerbankPlugin.simulator = PowerbankSimulator

__all__ = ["PowerbankConfig", "PowerbankPlugin", "PowerbankSimulator"]
