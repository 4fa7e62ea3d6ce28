"""What a run leaves on disk: PNGs, maps.npz, TensorBoard image events and results.json.

Pictures are made in ``vizkit.core.pictures``; this package encodes and writes them."""
