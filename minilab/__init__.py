"""minilab: fine-tune language models as text classifiers, in plain PyTorch."""

__version__ = "0.1.0"
