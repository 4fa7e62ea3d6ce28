"""Method plugins, one file per method, grouped by kind (attribution, optimization, adversarial,
inspection). Base classes live in `vizkit.methods.base`."""
