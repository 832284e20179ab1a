"""Pure planning: from a DeepSeekDeployment and its observed children to the objects to apply,
the children to delete, the status to write and the Events to post (no kopf, no kubernetes client).
"""

from .fingerprint import fingerprint, fingerprint_inputs
from .observed import Observed
from .plan import plan
from .state import Delete, Plan
from .status import EventSpec

__all__ = ["Delete", "EventSpec", "Observed", "Plan", "fingerprint", "fingerprint_inputs", "plan"]
