"""The face: the ``vizkit`` and ``vizkit-layers`` commands, Hydra's configs, run directories, sweep callbacks.

The only layer that sees Hydra's DictConfig; it hands ``vizkit.run`` typed settings."""
