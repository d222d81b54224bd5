"""rCM few-step sampling (TrigFlow schedule, dual-expert switch)."""

from turbowan.sampler.rcm import RCMSchedule, StepInfo, rcm_sample, rcm_schedule

__all__ = ["RCMSchedule", "StepInfo", "rcm_sample", "rcm_schedule"]
