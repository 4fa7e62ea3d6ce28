"""What methods measure a network with: input gradients, activation rules, attention maps, baselines, receptive fields.

Imports only ``vizkit.core``."""
