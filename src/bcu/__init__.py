"""bcu: label-free backdoor cleansing of image classifiers (Pang et al., CVPR 2023)."""
__version__ = "0.1.0"
