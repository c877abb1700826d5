"""The DVC stages of the transfer-learning study, one module each, and what they share."""
