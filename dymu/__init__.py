"""dymu: controllable multi-task networks, from task affinity to compiled trees.

Importing the package stays light: heavy optional dependencies (onnxruntime, tensorrt,
matplotlib) are imported only inside the functions that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
