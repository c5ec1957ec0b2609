"""notify()'s native path for plain events (no result, no error): the engine
formats the JSON itself; it must be byte-for-byte JobEvent.to_json()."""

from __future__ import annotations

import asyncio

import pytest

from blueprint_notify import JobEvent, JobNotifier, JobStatus


@pytest.fixture
def notifier() -> JobNotifier:
    n = JobNotifier()
    yield n
    n.close(0)


@pytest.mark.parametrize("status", list(JobStatus))
def test_native_json_is_to_json(notifier: JobNotifier, status: JobStatus) -> None:
    engine = notifier._engine
    for progress in (None, 0, 1, 9, 10, 99, 100):
        for ts in (0, 1, 9, 10, 1_795_620_470, 2**63 - 1):
            event = JobEvent(status, progress=progress, timestamp=ts)
            done = engine.notify_plain("job", event, None, True)
            assert done is not None
            _seq, body = done
            assert body == event.to_json().encode()


def test_events_that_are_not_plain_take_the_python_path(notifier: JobNotifier) -> None:
    engine = notifier._engine
    assert engine.notify_plain("job", JobEvent(JobStatus.COMPLETED, result={"a": 1}), None, True) is None
    assert engine.notify_plain("job", JobEvent(JobStatus.FAILED, error="boom"), None, True) is None
    # Fields forced to other types (object.__setattr__ past the frozen
    # dataclass) are not plain either: no crash, the Python path decides.
    odd = JobEvent(JobStatus.PROCESSING, progress=5)
    object.__setattr__(odd, "progress", True)
    assert engine.notify_plain("job", odd, None, False) is None
    object.__setattr__(odd, "progress", 101)
    assert engine.notify_plain("job", odd, None, False) is None
    object.__setattr__(odd, "progress", 5)
    object.__setattr__(odd, "timestamp", 2**64)
    assert engine.notify_plain("job", odd, None, False) is None
    object.__setattr__(odd, "timestamp", -1)
    assert engine.notify_plain("job", odd, None, False) is None


def test_subscribers_get_both_paths_in_order(notifier: JobNotifier) -> None:
    class Tagged(JobEvent):
        pass

    sent = [
        JobEvent(JobStatus.QUEUED),
        JobEvent(JobStatus.PROCESSING, progress=50),
        Tagged(JobStatus.PROCESSING, progress=60),  # a subclass: Python path
        JobEvent(JobStatus.PROCESSING, progress=70, error="retrying"),
        JobEvent(JobStatus.COMPLETED, result={"rows": 3}),
    ]

    async def main() -> list[tuple[int, JobEvent]]:
        sub = notifier.subscribe("job")
        for event in sent:
            notifier.notify("job", event)
        got = []
        async for event in sub:
            got.append((sub.last_event_id, event))
        return got

    got = asyncio.run(asyncio.wait_for(main(), 5))
    assert [seq for seq, _ in got] == [1, 2, 3, 4, 5]
    assert [event.to_json() for _, event in got] == [event.to_json() for event in sent]


def test_bad_input_on_the_native_path_names_the_field(notifier: JobNotifier) -> None:
    plain = JobEvent(JobStatus.PROCESSING, progress=1)
    with pytest.raises(ValueError, match="job_id"):
        notifier.notify("", plain)
    with pytest.raises(ValueError, match="job_id"):
        notifier.notify("a\r\nb", plain)
    with pytest.raises(TypeError, match="job_id"):
        notifier.notify(42, plain)  # type: ignore[arg-type]
    with JobNotifier(signing_secret="s") as signing:
        with pytest.raises(ValueError, match="webhook_url"):
            signing.notify("job", plain, "gopher://x")
