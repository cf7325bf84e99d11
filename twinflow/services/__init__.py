"""Local Kafka, QuestDB, Mosquitto and Prometheus on loopback, without Docker."""
