"""ditctl: fine-tune text-to-image Diffusion Transformers from one workspace."""

__version__ = "0.1.0"
