"""The ground every layer stands on: models, targets, pixels, hooks, inputs, pictures, errors.

Imports nothing above it (no methods, runs, output, Hydra or Lightning)."""
