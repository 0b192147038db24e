"""minigpt: prune one general pretrained LLM into many small domain experts, as a distributed Ray batch job.

Stages (each its own module): corpora -> calibrate (stats) -> scoring -> plan -> slim -> recover -> evaluate -> report,
run by minigpt.pipeline. The maths modules (stats, scoring, plan, slim) are pure torch and need no Ray.
"""

from minigpt.config import ConfigError, JobConfig, load
from minigpt.plan import PruningPlan

__all__ = ["ConfigError", "JobConfig", "PruningPlan", "load"]
__version__ = "0.1.0"
