"""Shared machinery of the optimization family: images made by optimizing them through a frozen network.

    parameterization  what the optimizer changes: plain pixels, or a Fourier spectrum with decorrelated colour
    transforms        transformation robustness: pad, jitter, scale, rotate (seeded)
    regularizers      priors: L2, total variation, alpha-norm; Yosinski's decay, blur and clipping
    objectives        what the image should excite: targets, weighted sums of them, diversity
    problem           one optimization as a module whose only parameters are the image's
    loop              the frozen-model guard and the plain torch loop (Python users)
    lightning         the same problem as a Lightning fit (the ``vizkit`` command)
    run               an optimization run's outputs under Hydra
"""
