"""The runtime: samplers with CFG over a compiled bundle, switching engines per timestep (DESIGN.md §5)."""

from .pipeline import Pipeline, PipelineOutput, StepTrace
from .samplers import DDIMSampler, DDPMSampler, DPMSolverPPSampler, Sampler, make_sampler
from .scheduler import GroupSpec, Scheduler

__all__ = ["DDIMSampler", "DDPMSampler", "DPMSolverPPSampler", "GroupSpec", "Pipeline", "PipelineOutput", "Sampler",
           "Scheduler", "StepTrace", "make_sampler"]
