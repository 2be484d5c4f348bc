"""The query service under hostile or broken requests, over raw sockets: every case gets an
HTTP answer with a JSON error and the right status (never a dropped connection), raw run
files are not served by default, and slow clients are let go."""

import io
import json
import logging
import os
import resource
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from featscope.pipelines.app.serve import make_server


@pytest.fixture(scope="module")
def port(reported_run):
    server = make_server(reported_run, port=0, max_upload=200_000, max_pixels=1_000_000, header_timeout=1,
                         body_timeout=1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    time.sleep(0.3)
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def exchange(port: int, request: bytes, *, pause: float = 0.0, rest: bytes = b"") -> tuple[int | None, dict | bytes]:
    """Send raw bytes (then, after `pause`, `rest`); read until the server closes. (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        if pause:
            time.sleep(pause)
            try:
                s.sendall(rest)
            except OSError:
                pass
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    if not data:
        return None, b""
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def received_until(s: socket.socket, phrase: bytes) -> bytes:
    """What the server sent on `s` up to and including `phrase` (perhaps a little more); a
    connection closed before it is a failure, not a loop that waits for ever."""
    data = b""
    while phrase not in data:
        chunk = s.recv(65536)
        assert chunk, f"the connection closed before {phrase!r}: {data[:300]!r}"
        data += chunk
    return data


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


def post(path: str, body: bytes, length: str | None = None, extra: str = "") -> bytes:
    length = str(len(body)) if length is None else length
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {length}\r\n{extra}\r\n"
    return head.encode() + body


def png_declaring(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height)).save(out, format="PNG")  # zeros: a few KB for millions of pixels
    return out.getvalue()


UPLOAD = "/api/neighbours?layer=pool&k=3"
CASES = [  # (name, request, expected statuses, phrase in the JSON error)
    ("dot-dot", get("/../run.json"), (403, 404), ""),
    ("encoded dot-dot", get("/%2e%2e/%2e%2e/etc/passwd"), (403, 404), ""),
    ("encoded slashes", get("/report/..%2f..%2f..%2fetc%2fpasswd"), (403, 404), ""),
    ("double slash", get("//etc/passwd"), (403, 404), ""),
    ("encoded root", get("/%2Fetc%2Fpasswd"), (403, 404), ""),
    ("NUL", get("/report/%00index.html"), (403, 404), ""),
    ("docs assets dot-dot", get("/api-docs-assets/../run.json"), (403, 404), ""),
    ("docs assets encoded dot-dot", get("/api-docs-assets/%2e%2e/%2e%2e/%2e%2e/etc/passwd"), (403, 404), ""),
    ("docs asset that is not there", get("/api-docs-assets/nothing.js"), (404,), ""),
    ("run.json", get("/run.json"), (404,), "expose-run-files"),
    ("manifest", get("/manifest.parquet"), (404,), "expose-run-files"),
    ("index meta", get("/index/pool/meta.json"), (404,), "expose-run-files"),
    ("features", get("/features/pool/part-00000.parquet"), (404,), "expose-run-files"),
    ("negative length", post(UPLOAD, b"abc", "-1"), (400,), "malformed request: Invalid character in Content-Length"),
    ("two lengths", post(UPLOAD, b"abcdefg", "5", "Content-Length: 7\r\n"), (400,), "Duplicate Content-Length"),
    ("length and chunked", post(UPLOAD, b"0\r\n\r\n", "5", "Transfer-Encoding: chunked\r\n"), (400,),
     "Transfer-Encoding can't be present with Content-Length"),
    ("declared over the limit", post(UPLOAD, b"\0" * 1000, "300000"), (413,), "over the limit"),
    ("chunked over the limit", f"POST {UPLOAD} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
     "Transfer-Encoding: chunked\r\n\r\n".encode() + b"".join(b"10000\r\n" + b"\0" * 65536 + b"\r\n"
                                                                for _ in range(5)) + b"0\r\n\r\n", (413,),
     "over the limit"),
    ("too many pixels", post(UPLOAD, png_declaring(2000, 2000)), (422,), "too large"),
    ("not an image", post(UPLOAD, b"GIF89a not really"), (415,), "not a readable image"),
    ("empty upload", post(UPLOAD, b""), (400,), "empty"),
    ("upload to an unknown layer", post("/api/neighbours?layer=fc9", b"x"), (400,), "no index for layer"),
    ("missing id", get("/api/neighbours?layer=pool"), (400,), "id"),
    ("id not a number", get("/api/neighbours?id=abc&layer=pool"), (422,), "id"),
    ("unknown id", get("/api/neighbours?id=999999&layer=pool"), (404,), "no image 999999"),
    ("k zero", get("/api/neighbours?id=0&layer=pool&k=0"), (400,), "k must be"),
    ("k huge", get("/api/neighbours?id=0&layer=pool&k=100000"), (400,), "k must be"),
    ("unknown layer", get("/api/neighbours?id=0&layer=fc9"), (400,), "no index for layer 'fc9'"),
    ("unknown image", get("/api/image/424242"), (404,), "no image"),
    ("id past int64", get("/api/neighbours?id=9223372036854775808&layer=pool"), (422,), "id"),  # was a 500
    ("image id past int64", get("/api/image/99999999999999999999"), (422,), "image_id"),
    ("explain id past int64", get("/api/explain?a=99999999999999999999&b=0&layer=pool"), (422,), "a"),
    ("negative id", get("/api/neighbours?id=-1&layer=pool"), (422,), "id"),
    ("unknown API", get("/api/nothing"), (404,), "no such API"),
    ("not a request", b"HELLO THERE\r\n\r\n", (400,), "malformed request: Invalid method"),
]


@pytest.mark.parametrize("name, request_bytes, statuses, phrase", CASES, ids=[c[0] for c in CASES])
def test_every_bad_request_gets_a_json_error(port, name, request_bytes, statuses, phrase):
    status, body = exchange(port, request_bytes)
    assert status in statuses, (name, status, body)
    assert isinstance(body, dict) and "error" in body, (name, body)
    assert phrase in body["error"], (name, body)
    assert b"root:" not in json.dumps(body).encode()


def test_a_body_that_stalls_and_headers_that_never_end_are_answered_408(port):
    start = time.perf_counter()
    status, body = exchange(port, post(UPLOAD, b"12345", "10"), pause=3, rest=b"67890")
    assert status == 408 and "did not arrive" in body["error"]
    status, body = exchange(port, b"GET /report/index.html HTTP/1.1\r\nHost: x\r\n", pause=3, rest=b"\r\n")
    assert status == 408 and "head not received" in body["error"]
    assert time.perf_counter() - start < 9


def test_a_body_that_keeps_arriving_is_read_to_its_end_past_the_body_timeout(port):
    """The 1 s body timeout is for a stall: four pieces 0.6 s apart (2.4 s in all) are read."""
    body = b"not an image, " * 4
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(post(UPLOAD, b"", str(len(body))))
        for piece in range(4):
            time.sleep(0.6)
            s.sendall(body[piece * 14:(piece + 1) * 14])
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status, answer = int(data.split(b" ", 2)[1]), json.loads(data.partition(b"\r\n\r\n")[2])
    assert status == 415 and "not an image" in answer["error"], (status, answer)


def test_an_upload_past_the_limit_is_answered_to_a_client_that_sends_it_whole_first(port):
    """urllib asks to close the connection and sends the whole body before it reads. The
    service answered 413 at the head and closed with the body unread, so the kernel reset the
    connection and urllib said "Connection reset by peer" instead. Now the answer goes out, and
    the rest of the request is read and dropped until it ends."""
    for body in (b"\0" * 5_000_000, iter([b"\0" * 65536] * 40)):  # declared, and chunked (no length)
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{UPLOAD}", data=body), timeout=10)
        assert answer.value.code == 413 and "over the limit" in json.loads(answer.value.read())["error"]
    chunks = b"".join(b"10000\r\n" + b"\0" * 65536 + b"\r\n" for _ in range(40)) + b"0\r\n\r\n"
    for _ in range(5):  # raw: the whole request, then read to the end; never a reset
        start = time.perf_counter()
        status, body = exchange(port, f"POST {UPLOAD} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                      "Transfer-Encoding: chunked\r\n\r\n".encode() + chunks)
        assert status == 413 and "over the limit" in body["error"]
        assert time.perf_counter() - start < 1.5  # closed when the request ended, not after a wait


def test_a_client_that_stops_sending_after_an_early_answer_is_let_go(port):
    """The rest of a refused body is read only while it keeps coming: a client that declares
    5 MB and stops after 100 KB gets its 413 and the end of the connection within seconds."""
    start = time.perf_counter()
    status, body = exchange(port, post(UPLOAD, b"\0" * 100_000, "5000000"))
    assert status == 413 and "over the limit" in body["error"]
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("path, status, phrase", [(UPLOAD, 413, b"over the limit"),
                                                   ("/api/neighbours?layer=nope&k=3", 400, b"no index for layer")],
                         ids=["over the limit", "unknown layer"])
def test_a_keep_alive_upload_answered_early_ends_its_connection_when_its_body_ends(port, path, status, phrase):
    """An answer given at the head of an upload on a keep-alive connection: a 413 for a body
    over the limit, a 400 for a layer with no index. The service kept such a connection and
    read the rest of the body for as long as it came (the 400 case until this change), and
    for the 413 the deadline for the next request's head started at the answer: past it (1 s
    here) the service wrote a stray 408 while the body still arrived. Now every answer given
    while the body still arrives says the connection closes, and it ends when the body has
    wholly arrived, with nothing written after the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n".encode()
                  + b"\0" * 100_000)
        data = received_until(s, phrase)
        assert data.startswith(f"HTTP/1.1 {status}".encode()) and b"connection: close" in data.lower(), data[:300]
        for _ in range(4):  # the rest of the body, slowly: 2 s in all, past the head deadline
            time.sleep(0.5)
            s.sendall(b"\0" * 50_000)
        ended = time.perf_counter()
        while chunk := s.recv(65536):
            data += chunk
    assert time.perf_counter() - ended < 1 and data.count(b"HTTP/1.1") == 1, data[:300]


def test_an_unexpected_error_while_a_body_arrives_ends_the_connection_too(reported_run, monkeypatch):
    """Starlette answers an unexpected error (500) from outside the application's middleware;
    the connection rule sits outside the application, so that answer ends the connection too."""
    server = make_server(reported_run, port=0)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.service, "checked_upload_layer", broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
            s.sendall(f"POST {UPLOAD} HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n".encode()
                      + b"\0" * 100_000)
            data = received_until(s, b"a bug")
            assert data.startswith(b"HTTP/1.1 500") and b"connection: close" in data.lower(), data[:300]
            s.sendall(b"\0" * 200_000)
            while chunk := s.recv(65536):
                data += chunk
        assert data.count(b"HTTP/1.1") == 1, data[:300]
    finally:
        server.shutdown()
        server.server_close()


def test_a_websocket_upgrade_is_answered_as_plain_http_without_advice_to_install_anything(port):
    """uvicorn logged two warnings for each such request, one telling the operator to install a
    WebSocket library, which this service has no use for."""
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("uvicorn.error").addHandler(handler)
    upgrade = (b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
    request = get("/api/image/0").replace(b"Connection: close\r\n", upgrade)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(request)
            data = received_until(s, b"}")
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert data.startswith(b"HTTP/1.1 200") and b'"image_id":0' in data, data[:300]
    assert logged == [], logged


def test_a_flood_of_malformed_requests_is_answered_each_and_logged_in_one_line(port):
    """uvicorn logged a warning for each malformed request: a client sending garbage in a loop
    filled the log as fast as it sent."""
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("uvicorn.error").addHandler(handler)
    try:
        answers = [exchange(port, b"HELLO THERE\r\n\r\n") for _ in range(30)]
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert all(status == 400 and "malformed request" in body["error"] for status, body in answers), answers[:3]
    assert len(logged) <= 1, logged  # the first of a minute, unless an earlier test's was


def test_malformed_request_lines_are_summed_up_once_a_minute():
    from featscope.pipelines.app.serve_connections import MalformedRequestLog

    now = [100.0]
    summary = MalformedRequestLog(every=60, clock=lambda: now[0])
    logger = logging.getLogger("featscope.test.malformed")
    logger.propagate = False
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logger.addHandler(handler)
    logger.addFilter(summary)
    for t in (100, 101, 130, 159, 161, 170, 300):
        now[0] = t
        logger.warning(MalformedRequestLog.MESSAGE)
    logger.warning("something else")
    assert logged == [MalformedRequestLog.MESSAGE,
                      "Invalid HTTP request received: 4 malformed requests in the last 61 s, each answered 400",
                      "Invalid HTTP request received: 2 malformed requests in the last 139 s, each answered 400",
                      "something else"]


def test_a_keep_alive_request_whose_body_was_read_stays_alive(port):
    """An error after the whole body was read (a picture that does not decode) keeps the
    connection: only an answer given while the body still arrives ends it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for _ in range(2):
            s.sendall(post(UPLOAD, b"not a picture").replace(b"Connection: close\r\n", b""))
            data = received_until(s, b"}")
            assert data.startswith(b"HTTP/1.1 415") and b"connection: close" not in data.lower(), data[:300]


def test_clients_that_stop_reading_are_cut_off_and_free_their_places(reported_run):
    """Two clients that ask for a large picture and read none of it held both places in flight
    for ever, so every other request was answered 503. After the send timeout they are cut off."""
    large = reported_run.root / "patches" / "zz-large.png"
    large.write_bytes(os.urandom(30_000_000))  # past what the kernel's buffers hold for a client
    server = make_server(reported_run, port=0, send_timeout=1, max_in_flight=2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port, stuck = server.server_address[1], []
    try:
        time.sleep(0.3)
        for _ in range(2):
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect(("127.0.0.1", port))
            client.sendall(get("/patches/zz-large.png"))
            stuck.append(client)
        time.sleep(0.5)
        assert exchange(port, get("/api/image/0"))[0] == 503  # both places taken
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # kept alive, but a body unread:
            s.sendall(post(UPLOAD, b"\0" * 1000).replace(b"Connection: close\r\n", b""))  # the 503 ends it
            busy = b""
            while chunk := s.recv(65536):
                busy += chunk
        assert busy.startswith(b"HTTP/1.1 503") and b"connection: close" in busy.lower()
        time.sleep(2)
        assert exchange(port, get("/api/image/0"))[0] == 200
        for client in stuck:  # what the kernel held for it, then the end: not the whole file
            client.settimeout(5)
            received = 0
            try:
                while chunk := client.recv(1 << 20):
                    received += len(chunk)
            except ConnectionResetError:
                pass
            assert received < 30_000_000
    finally:
        for client in stuck:
            client.close()
        server.shutdown()
        server.server_close()
        large.unlink()


def test_a_thousand_idle_connections_leave_room_for_a_request(reported_run):
    """With the usual soft limit on open files (1,024; 256 here), that many idle connections
    made every new connection fail with a reset. The service raises the limit as it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"this machine's hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    idle = []
    try:
        server = make_server(reported_run, port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        time.sleep(0.3)
        port = server.server_address[1]
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(600)]
        time.sleep(0.5)
        status, body = exchange(port, get("/api/image/0"))
        assert status == 200 and body["image_id"] == 0
        server.shutdown()
        server.server_close()
    finally:
        for client in idle:
            client.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_report_folder_leads_to_its_page_and_files_answer_head(port, reported_run):
    """/report and /report/ were 404s; HEAD of a file (a link checker, `curl -I`) was a 405."""
    for path in ("/", "/report", "/report/"):
        answer = exchange(port, get(path))
        assert answer[0] == 302, (path, answer)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"HEAD /report/index.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    size = (reported_run.report_dir / "index.html").stat().st_size
    assert head.startswith(b"HTTP/1.1 200") and f"content-length: {size}".encode() in head.lower() and body == b""


def test_raw_run_files_are_served_only_when_exposed(reported_run):
    server = make_server(reported_run, port=0, expose_run_files=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        time.sleep(0.3)
        status, body = exchange(server.server_address[1], get("/run.json"))
        assert status == 200 and body == json.loads((reported_run.root / "run.json").read_text())
    finally:
        server.shutdown()
        server.server_close()


def test_a_symlink_out_of_the_run_stays_refused(port, reported_run, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    link = reported_run.report_dir / "leak.html"
    os.symlink(secret, link)
    try:
        status, body = exchange(port, get("/report/leak.html"))
        assert status == 403 and b"not yours" not in json.dumps(body).encode()
    finally:
        link.unlink()
