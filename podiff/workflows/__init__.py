"""The workflows the ``podiff`` command runs, as library calls: ``train``, ``sample``, ``evaluate``
and ``demo``, each taking a request (a dataclass whose defaults are the command's)."""

from podiff.workflows.common import DataSource, WorkflowError
from podiff.workflows.demo import DemoRequest, demo, demo_config
from podiff.workflows.evaluate import EvaluateRequest, evaluate
from podiff.workflows.fit_pod import fit_pod
from podiff.workflows.sample import SampleRequest, sample
from podiff.workflows.train import TrainRequest, train

__all__ = ["DataSource", "DemoRequest", "EvaluateRequest", "SampleRequest", "TrainRequest", "WorkflowError", "demo",
           "demo_config", "evaluate", "fit_pod", "sample", "train"]
