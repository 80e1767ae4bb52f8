"""The coordinator of a real federation: ``run_server`` (the round loop) over ``RoundCoordinator`` (the
state the gRPC transport reads and feeds)."""

from fedtune.server.coordinator import OBSERVER, RoundCoordinator, fingerprint_diff, natural_key
from fedtune.server.loop import FederationError, ServerResult, federation_strategy_config, run_server

__all__ = ["OBSERVER", "FederationError", "RoundCoordinator", "ServerResult", "federation_strategy_config",
           "fingerprint_diff", "natural_key", "run_server"]
