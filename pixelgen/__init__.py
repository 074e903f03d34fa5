"""pixelgen: pixel-space image generation library (data, models, objectives, training engine, evaluation).

Knows nothing about SLURM or submitit; that lives in the `pipeline` package.
"""

__version__ = "0.1.0"
