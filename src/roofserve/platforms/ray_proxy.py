"""Ray Serve's HTTP proxy, answering as our LitServe servers do when a replica dies under a request: a
503 + Retry-After in our error body, or, for a stream that had begun, an error event and `[DONE]`.

Ray 2.60's proxy turns the exception it gets from a dead replica (RayActorError) into a status 500 that
it never sends: its ASGI app returns without a response, and uvicorn answers a plain-text
`500 Internal Server Error` (or, mid-stream, closes the connection). Ray's one hook in front of its
proxy is a function that returns Starlette middlewares, named by RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
and read when the proxy starts: `middlewares` below (PROXY_CALLBACK). `serve_on_ray` sets it for the local
instance it starts; a cluster it joins needs it in its nodes' environment (the RayService manifest sets it).

Only requests the proxy left unanswered are touched: an answer from a replica, our 500s included, goes
through as it is. No torch here: the proxy imports this module.
"""

from __future__ import annotations

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "roofserve.platforms.ray_proxy.middlewares"
DIED = "the replica serving this request died and is being restarted; retry shortly"


def middlewares() -> list:
    from starlette.middleware import Middleware

    return [Middleware(ReplicaDiedMiddleware)]


class ReplicaDiedMiddleware:
    """Pure ASGI, outermost in the proxy: answers what the proxy left unanswered (see the module doc)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, stream, ended = False, False, False

        async def watch(message) -> None:
            nonlocal started, stream, ended
            if message["type"] == "http.response.start":
                started = True
                stream = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                             for k, v in message.get("headers", ()))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        await self.app(scope, receive, watch)
        if started and (ended or not stream):
            return
        # fastapi, imported here and not at the top: k8s.py imports this module for its constants
        from roofserve.llm.protocol import Formatter
        from roofserve.server.http import error_response

        if not started:
            await error_response(503, DIED)(scope, receive, send)
        else:  # a stream that had begun: the chat server's own error event
            await send({"type": "http.response.body", "body": (Formatter.error(503, DIED) + "data: [DONE]\n\n").encode(),
                        "more_body": False})
