"""SLURM launchers (submitit) for timm_cbsa training: ``python -m slurm.launch --help``."""
