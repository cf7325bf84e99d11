"""I/O: one module per external system (Kafka, QuestDB, MQTT, OPC UA)."""
