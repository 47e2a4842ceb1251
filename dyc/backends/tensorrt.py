"""The ``tensorrt`` backend (``get_backend("tensorrt")``): implementation in ``dyc/tensorrt/``.

``TensorRTBackend`` runs a bundle's engines; ``build_engines`` / ``build_engines_cmd`` build them
(``dyc build-engines BUNDLE``, and ``dyc compile --backend tensorrt``). Importing this module does not
import TensorRT: ``TensorRTBackend.available()`` says whether it is installed and a GPU is present.
"""

from ..tensorrt.build import build_engines
from ..tensorrt.cli import build_engines_cmd
from ..tensorrt.runtime import TensorRTBackend, inspect_plan

__all__ = ["TensorRTBackend", "build_engines", "build_engines_cmd", "inspect_plan"]
