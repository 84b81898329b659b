"""The no-op Flower app: the floor of the fedlinear benchmark."""
