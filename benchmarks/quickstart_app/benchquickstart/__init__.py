"""The quickstart-style reference app of the fedlinear benchmark."""
