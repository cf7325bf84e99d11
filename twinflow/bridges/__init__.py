"""Bridges from plant protocols (MQTT, OPC UA) into Kafka's ``twin.raw``."""
