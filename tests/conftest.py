pytest_plugins = ["gatewayd.testing.fixtures"]
