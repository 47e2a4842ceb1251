"""The runtime: samplers with CFG over a compiled bundle, switching engines per timestep (DESIGN.md §5).

Names load on first use (PEP 562): ``dyc run`` registers its command without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {
    "Pipeline": ".pipeline", "PipelineOutput": ".pipeline", "StepTrace": ".pipeline",
    "DDIMSampler": ".samplers", "DDPMSampler": ".samplers", "DPMSolverPPSampler": ".samplers", "Sampler": ".samplers",
    "make_sampler": ".samplers",
    "GroupSpec": ".scheduler", "Scheduler": ".scheduler",
}
__all__ = ["DDIMSampler", "DDPMSampler", "DPMSolverPPSampler", "GroupSpec", "Pipeline", "PipelineOutput", "Sampler",
           "Scheduler", "StepTrace", "make_sampler"]

if TYPE_CHECKING:
    from .pipeline import Pipeline, PipelineOutput, StepTrace
    from .samplers import DDIMSampler, DDPMSampler, DPMSolverPPSampler, Sampler, make_sampler
    from .scheduler import GroupSpec, Scheduler


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
