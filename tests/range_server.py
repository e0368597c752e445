"""A local HTTP server over a folder, with Range requests, for the download tests (no network)."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path


class RangeServer:
    """HTTP over a folder on 127.0.0.1, with Range requests (206; 416 past the end), recording the requests."""

    def __init__(self, folder: Path):
        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                f = folder / self.path.lstrip("/")
                if not f.is_file():
                    self.send_error(404)
                    return
                data, rng = f.read_bytes(), self.headers.get("Range")
                seen.append((self.path, rng))
                start = int(rng.split("=")[1].rstrip("-")) if rng else 0
                if start >= len(data):  # as real servers answer a range past the end (RFC 9110, 15.5.17)
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

            def log_message(self, *a):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
