"""The live web demo: ``python -m blueprint_notify demo`` (or
``blueprint-notify demo``).

A small page served on 127.0.0.1 with :func:`blueprint_notify.asgi.sse_app`
mounted: start simulated jobs and watch their progress through
``EventSource``, see each signed webhook reach a built-in receiver that
verifies its signature, flip that endpoint to failing and watch the retries
end in the dead letters. Plain HTML, JavaScript and CSS shipped in the
package (``static/``); no build step, nothing loaded from the network.

:class:`DemoApp` is a plain ASGI application; running it needs uvicorn (the
``demo`` extra): ``pip install 'blueprint_notify[demo]'``.
"""

from .app import DemoApp

__all__ = ["DemoApp"]
