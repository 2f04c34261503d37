"""Tasks and data (DESIGN.md §7): seeded generators and local-file loaders, with perturbations."""

from creditscape.tasks._base import Splits as Splits
from creditscape.tasks._base import Task as Task
from creditscape.tasks._base import add_input_noise as add_input_noise
from creditscape.tasks._base import get_task as get_task
from creditscape.tasks._base import make_splits as make_splits
from creditscape.tasks._base import register_task as register_task
from creditscape.tasks._base import task_class as task_class
from creditscape.tasks._base import task_names as task_names
from creditscape.tasks._base import task_parameters as task_parameters
from creditscape.tasks._cue_recall import CueRecall as CueRecall
from creditscape.tasks._cognitive import PerceptualDecision as PerceptualDecision
from creditscape.tasks._cognitive import DelayedMatchToSample as DelayedMatchToSample
from creditscape.tasks._cognitive import ContextDecision as ContextDecision
from creditscape.tasks._evidence import EvidenceAccumulation as EvidenceAccumulation
from creditscape.tasks._pattern import PatternGeneration as PatternGeneration
from creditscape.tasks._smnist import SequentialMNIST as SequentialMNIST
from creditscape.tasks._mnist_files import Mnist as Mnist
from creditscape.tasks._mnist_files import MnistFormatError as MnistFormatError
from creditscape.tasks._mnist_files import MnistNotFoundError as MnistNotFoundError
from creditscape.tasks._mnist_files import load_mnist as load_mnist

__all__ = [
    "Task", "Splits", "register_task", "get_task", "task_class", "task_names", "task_parameters",
    "make_splits", "add_input_noise",
    "CueRecall", "PerceptualDecision", "DelayedMatchToSample", "ContextDecision",
    "EvidenceAccumulation", "PatternGeneration", "SequentialMNIST",
    "Mnist", "MnistNotFoundError", "MnistFormatError", "load_mnist",
]
