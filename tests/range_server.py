"""A local HTTP server over a folder, with Range requests, for the download tests (no network)."""
from __future__ import annotations

import http.server
import threading
from pathlib import Path


class RangeServer:
    """HTTP over a folder on 127.0.0.1, with Range requests (206), recording the requests."""

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
