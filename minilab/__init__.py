"""minilab: fine-tune language models as text classifiers, in plain PyTorch."""

__version__ = "0.1.0"


def __getattr__(name):  # `from minilab import load_classifier`, without importing torch for `import minilab`
    if name == "load_classifier":
        from .predict import load_classifier

        return load_classifier
    raise AttributeError(name)
