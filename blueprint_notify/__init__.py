"""blueprint_notify: job notifications for Python orchestrators.

Signed webhooks delivered by a native libcurl thread (retries, per-job
order, dead letters, SSRF guard) and per-job Server-Sent Event channels read
by asyncio subscribers.
"""

from ._broker import BrokerError
from ._config import NotifierConfig, __version__
from ._core import ChannelLimitError, StoreError, StoreLockedError
from ._events import Attempt, FailedDelivery, JobEvent, JobStatus
from ._notifier import JobNotifier
from ._subscription import Subscription, SubscriptionClosed, SubscriptionLagged
from ._verify import SignatureError, verify

__all__ = [
    "Attempt",
    "BrokerError",
    "ChannelLimitError",
    "FailedDelivery",
    "JobEvent",
    "JobNotifier",
    "JobStatus",
    "NotifierConfig",
    "SignatureError",
    "StoreError",
    "StoreLockedError",
    "Subscription",
    "SubscriptionClosed",
    "SubscriptionLagged",
    "__version__",
    "verify",
]
