"""Executing a run: typed settings in (``vizkit.run.settings``), results.json, pictures and TensorBoard
events out. ``vizkit.run.execute.execute`` picks the family by the method's base class; each family
(attribution, optimization, adversarial, inspection) follows the protocol in ``vizkit.run.family``.

Nothing here reads Hydra's config: ``vizkit.cli`` turns it into ``RunSettings``."""
