"""Message contracts: typed structs and the JSON Schema files of every topic."""
