"""Local Kafka, QuestDB and Mosquitto on loopback, without Docker."""
