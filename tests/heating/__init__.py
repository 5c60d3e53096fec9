"""Tests of the heating plugin, its MQTT client and simulator."""
