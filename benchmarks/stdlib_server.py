"""The query service as it was before the ASGI rewrite: the standard library's
`ThreadingHTTPServer` with a thread per connection, the whole manifest as a dict of rows,
uploads decoded and embedded one at a time under the model's lock. Kept here, unchanged in
behaviour, only as the baseline `serve_load.py` measures against."""

from __future__ import annotations

import errno
import json
import mimetypes
import socket
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.params import ParamError
from featscope.pipelines.core.features import ImageEmbedder
from featscope.pipelines.core.neighbours import neighbours_of, open_index
from featscope.pipelines.core.rundir import RunDir

API_NEIGHBOURS = ("/api/neighbours", "/api/neighbors")


class QueryService:
    """The run's manifest, indexes and (when first needed) model, shared by all requests."""

    def __init__(self, rd: RunDir, *, max_upload: int = 16 * 2**20, max_k: int = 100):
        from featscope.pipelines.core import manifest

        self.rd = rd
        self.root = rd.root.resolve()
        self.max_upload = max_upload
        self.max_k = max_k
        self.rows = {r["image_id"]: r for r in manifest.read(rd).to_pylist()}
        self.layers = rd.index_layers()
        self.indexes = {layer: open_index(rd, layer) for layer in self.layers}
        self.embedder = ImageEmbedder(rd.read_config(), self.layers)

    def image(self, image_id: int) -> dict:
        if image_id not in self.rows:
            raise KeyError(f"no image {image_id} in this run")
        row = self.rows[image_id]
        return {"image_id": image_id, "label": row["label"], "name": Path(row["path"]).name, "shard": row["shard"]}

    def neighbours(self, layer: str, k: int, *, image_id: int | None = None, upload: bytes | None = None) -> dict:
        if layer not in self.indexes:
            raise ValueError(f"no index for layer '{layer}'; indexed: {', '.join(self.layers) or 'none'}")
        if not 1 <= k <= self.max_k:
            raise ValueError(f"k must be between 1 and {self.max_k}")
        index = self.indexes[layer]
        if upload is not None:
            found = index.search_vectors(self.embedder.embed(upload, layer), k=k)
        else:
            if image_id not in self.rows:
                raise KeyError(f"no image {image_id} in this run")
            found = neighbours_of(index, [image_id], k)
        answer = [self.image(int(i)) | {"distance": float(d)}
                  for i, d in zip(found.image_ids[0], found.distances[0]) if i >= 0]
        return {"layer": layer, "query": image_id, "neighbours": answer[:k]}

    def file(self, url_path: str) -> tuple[Path | None, int]:
        """The file a URL path names and 200; or None and 403 if it resolves (after '..',
        encoded characters and symlinks) outside the run directory, 404 if there is none."""
        relative = unquote(url_path).lstrip("/")
        if "\x00" in relative:
            return None, 403
        candidate = (self.root / relative).resolve()
        if not candidate.is_relative_to(self.root):
            return None, 403
        return (candidate, 200) if candidate.is_file() else (None, 404)


class _Handler(BaseHTTPRequestHandler):
    service: QueryService
    server_version = "featscope"

    def log_message(self, format: str, *args) -> None:  # one quiet line per request on stderr
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        try:
            if url.path in ("", "/"):
                self.send_response(HTTPStatus.FOUND)
                self.send_header("Location", "/report/index.html")
                self.end_headers()
                return
            if url.path.startswith("/api/image/"):
                return self._json(200, self.service.image(int(url.path.rsplit("/", 1)[1])))
            if url.path in API_NEIGHBOURS:
                layer, k = query.get("layer", [""])[0], int(query.get("k", ["10"])[0])
                return self._json(200, self.service.neighbours(layer, k, image_id=int(query["id"][0])))
        except KeyError as e:
            return self._error(404, str(e).strip("'\"") if "no image" in str(e) else f"missing parameter {e}")
        except ValueError as e:
            return self._error(400, str(e))
        if url.path.startswith("/api/"):
            return self._error(404, f"no such API: {url.path}")
        path, status = self.service.file(url.path)
        if path is None:
            return self._error(status, "outside the run directory" if status == 403 else "not found")
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        if url.path not in API_NEIGHBOURS:
            return self._error(404, f"no such API: {url.path}")
        length = self.headers.get("Content-Length")
        if length is None:
            return self._error(411, "send the image as the request body, with a Content-Length")
        try:
            length = int(length)
        except ValueError:
            return self._error(400, "bad Content-Length")
        if length > self.service.max_upload:
            self.close_connection = True
            return self._error(413, f"upload of {length} bytes is over the limit of {self.service.max_upload}")
        data = self.rfile.read(length)
        query = parse_qs(url.query)
        try:
            answer = self.service.neighbours(query.get("layer", [""])[0], int(query.get("k", ["10"])[0]), upload=data)
        except ValueError as e:
            return self._error(400, str(e))
        except FeatscopeError as e:
            return self._error(400, str(e))
        self._json(200, answer)


def make_server(rd: RunDir, *, host: str = "127.0.0.1", port: int = 8000,
                max_upload: int = 16 * 2**20) -> ThreadingHTTPServer:
    """A ready server (port 0 picks a free one: see server.server_address)."""
    if not (rd.report_dir / "index.html").exists():
        raise FeatscopeError(f"run {rd.root} has no report yet: run `featscope report --run {rd.root}` first")
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OverflowError):
        raise ParamError("host", f"'{host}' is not an address or a host name of this network") from None
    handler = type("Handler", (_Handler,), {"service": QueryService(rd, max_upload=max_upload)})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ParamError("port", f"{port} is in use on {host}: choose another, or 0 for any free one") from None
        raise ParamError("host", f"cannot listen on {host}:{port}: {e.strerror}") from None
    server.daemon_threads = True
    return server
