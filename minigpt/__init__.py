"""minigpt: prune one general pretrained LLM into many small domain experts, as a distributed Ray batch job.

Stages, run by minigpt.pipeline from one table (their run functions are minigpt.stages): prepare -> [evaltext] ->
calibrate -> [general] -> [search] -> slim -> [teacher -> recover] -> [quantize] -> [export] -> evaluate -> report
([optional]). The maths modules (stats, scoring, refit, plandata, allocate, plan, slim, losses) are pure torch and
need no Ray; tests/test_imports.py keeps the imports flowing one way.
"""

import logging as _logging

# With torchao installed (int8 quantization), transformers imports it in every process; it then logs that CUDA-only
# kernels are missing and torch warns about its enums. Neither matters on CPU or changes results.
for _name in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

from minigpt.config import ConfigError  # noqa: E402
from minigpt.jobfile import JobConfig, load  # noqa: E402
from minigpt.plan import PruningPlan  # noqa: E402

__all__ = ["ConfigError", "JobConfig", "PruningPlan", "load"]
__version__ = "0.1.0"
