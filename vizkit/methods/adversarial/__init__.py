"""Adversarial methods: small input changes that change the network's mind, and images of nothing it is sure about."""
