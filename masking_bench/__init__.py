"""masking_bench: compare masking strategies for masked-image-modeling pre-training of ViTs, honestly and cheaply."""

__version__ = "0.1.0"
