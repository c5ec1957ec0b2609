"""blueprint_notify: job notifications for Python orchestrators.

Signed webhooks delivered by a native libcurl thread (retries, per-job
order, dead letters, SSRF guard) and per-job Server-Sent Event channels read
by asyncio subscribers.
"""

from ._config import NotifierConfig, __version__
from ._core import ChannelLimitError
from ._events import FailedDelivery, JobEvent, JobStatus
from ._notifier import JobNotifier
from ._subscription import Subscription, SubscriptionClosed, SubscriptionLagged

__all__ = [
    "ChannelLimitError",
    "FailedDelivery",
    "JobEvent",
    "JobNotifier",
    "JobStatus",
    "NotifierConfig",
    "Subscription",
    "SubscriptionClosed",
    "SubscriptionLagged",
    "__version__",
]
