"""What roofserve.server.lit takes from LitServe's private internals, pinned: a LitServe upgrade that
renames or reshapes one of them fails here, by name, before any server test does. The behaviours
built on them (worker restart, fast 503s, drain, a dead HTTP process) are tested for real in
tests/e2e/test_faults.py and test_reliability.py."""

import inspect

import litserve as ls
import pytest
from litserve.server import RegularRequestHandler
from litserve.utils import LitAPIStatus, ResponseBufferItem, WorkerSetupStatus

from roofserve.server.lit import PayloadHandler, RoofServer, StreamingPayloadHandler


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.mark.parametrize("name, params", [
    ("_start_server", ["port", "num_uvicorn_servers", "log_level", "sockets", "uvicorn_worker_type", "kwargs"]),
    ("_start_worker_monitoring", ["manager", "uvicorn_workers"]),
    ("_perform_graceful_shutdown", ["manager", "uvicorn_workers", "shutdown_reason"]),
    ("_register_api_endpoints", ["lit_api", "request_type", "response_type"]),
    ("setup_auth", ["lit_api"]),
    ("lifespan", ["app"]),
    ("_init_manager", ["num_api_servers"]),
])
def test_the_server_methods_we_override_keep_their_signatures(name, params):
    assert _params(getattr(ls.LitServer, name)) == params
    assert getattr(RoofServer, name) is not getattr(ls.LitServer, name), "RoofServer overrides it"


def test_the_server_attributes_we_read_are_set_by_litserve():
    source = inspect.getsource(ls.LitServer)
    for name in ("response_buffer", "workers_setup_status", "_shutdown_event", "_transport", "monitor_internal",
                 "uvicorn_graceful_timeout", "healthcheck_path", "info_path", "app"):
        assert f"self.{name}" in source, name
    assert _params(ls.LitServer.data_streamer) == ["q", "data_available", "send_status"]


def test_the_transport_interface_we_implement():
    from litserve.transport.base import MessageTransport

    from roofserve.server.transport import PipeTransport

    assert _params(MessageTransport.send) == _params(PipeTransport.send) == ["item", "consumer_id"]
    assert MessageTransport.__abstractmethods__ == {"send", "areceive"}  # what LitServe calls, with close
    assert all(callable(getattr(PipeTransport, name)) for name in ("send", "areceive", "close"))
    # LitServe's consumer task awaits areceive(consumer_id) and unpacks each message as RoofServer._deliver
    # does; _init_manager sets _transport
    consumer = inspect.getsource(ls.server.response_queue_to_buffer)
    assert "await transport.areceive(consumer_id)" in consumer
    assert "uid, (*response, response_type, worker_id) = result" in consumer
    assert "response_item.response_queue.append(response)" in consumer
    assert "self._transport = create_transport_from_config" in inspect.getsource(ls.LitServer._init_manager)


def test_the_request_handler_we_subclass():
    assert _params(RegularRequestHandler.__init__) == ["lit_api", "server"]
    assert _params(RegularRequestHandler._submit_request) == ["payload"]
    assert _params(RegularRequestHandler._handle_error_response) == ["response"]
    assert issubclass(PayloadHandler, RegularRequestHandler) and issubclass(StreamingPayloadHandler, RegularRequestHandler)


def test_the_status_values_and_buffer_items():
    assert {LitAPIStatus.START, LitAPIStatus.OK, LitAPIStatus.ERROR, LitAPIStatus.FINISH_STREAMING} == {
        "START", "OK", "ERROR", "FINISH_STREAMING"}
    assert (WorkerSetupStatus.READY, WorkerSetupStatus.STARTING) == ("ready", "starting")
    item = ResponseBufferItem(event=None)
    assert (item.response_queue, item.worker_id, item.response) == (None, None, None)
    assert _params(ResponseBufferItem) == ["event", "response_queue", "worker_id", "response"]


def test_litserve_is_the_version_these_overrides_were_written_for():
    """Upgrading LitServe is a deliberate step: read lit.py against the new source, then move this pin."""
    assert ls.__version__ == "0.2.19"
