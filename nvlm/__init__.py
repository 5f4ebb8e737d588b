"""nvlm: the NVLM-D/X/H model family, image processing, checkpoints, generation and the trainer.

Built on the public ops of nvlm_kernels (dependency direction: nvlm -> nvlm_kernels -> torch).
"""

__version__ = "0.1.0"
