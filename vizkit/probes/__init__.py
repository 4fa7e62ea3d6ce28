"""What methods measure a network with: input gradients, ReLU rules, baselines, receptive fields.

Imports only ``vizkit.core``."""
