"""A local stand-in for the Hugging Face Hub: the parts of its HTTP API that huggingface_hub calls to list and
download a model repo, on 127.0.0.1 in a thread.

- GET /api/models/{repo}[/revision/{rev}]?blobs=true: model info with siblings (size, blobId, and for LFS files
  lfs.sha256 / lfs.size), as `HfApi.model_info(files_metadata=True)` reads it.
- HEAD /{repo}/resolve/{rev}/{path}: X-Repo-Commit, ETag (git blob id, or the sha256 for LFS files), X-Linked-Etag
  and X-Linked-Size for LFS files, Content-Length — what `get_hf_file_metadata` reads.
- GET on the same path, with Range requests (206 + Content-Range) so a dropped transfer resumes.
- Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) as the hub sends them; a
  gated repo lists publicly (gated: "manual") and refuses its files without the right token.

- GET /cdn/{repo}/{path}: the same file as served from a CDN, where `redirect` sends a file's GET (302 + Location),
  as the hub sends large files to its CDN hosts.

Faults for tests: `drop_once` (send half the body, then close the connection), `tamper` (serve other bytes of the same
length, N times), fake listed sizes (`listed_size`), `redirect` to a base URL (this hub's own, or another host's).
Every request is logged as (method, path, Range header).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.gated: dict[str, str] = {}  # repo -> the token that opens it
        self.drop_once: set[tuple[str, str]] = set()
        self.tamper: dict[tuple[str, str], int] = {}  # (repo, path) -> times left to serve wrong bytes
        self.listed_size: dict[tuple[str, str], int] = {}
        self.redirect: dict[tuple[str, str], str] = {}  # (repo, path) -> base URL its GET is redirected to (/cdn/...)
        self.log: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                hub._handle(self, head=False)

            def do_HEAD(self):
                hub._handle(self, head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo: str, files: dict[str, bytes]) -> str:
        self.repos[repo] = dict(files)
        self.commits[repo] = hashlib.sha1(repo.encode() + b"".join(sorted(files.values()))).hexdigest()
        return self.commits[repo]

    def requests_for(self, repo: str, method: str = "GET") -> list[str]:
        """Paths of the files requested from `repo` with `method`."""
        prefix = f"/{repo}/resolve/"
        with self.lock:
            return [p[len(prefix) :].split("/", 1)[1] for m, p, _ in self.log if m == method and p.startswith(prefix)]

    # ------------------------------------------------------------------------------------------------ serving

    @staticmethod
    def _is_lfs(path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def _sibling(self, repo: str, path: str, data: bytes) -> dict:
        size = self.listed_size.get((repo, path), len(data))
        entry = {"rfilename": path, "size": size, "blobId": git_blob_id(data)}
        if self._is_lfs(path):
            entry["lfs"] = {"size": size, "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        return entry

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str | None, commit: str | None = None) -> None:
        body = json.dumps({"error": code or "error"}).encode()
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _repo_access(self, h: BaseHTTPRequestHandler, repo: str) -> bool:
        if repo not in self.repos:
            self._error(h, 404, "RepoNotFound")
            return False
        token = self.gated.get(repo)
        if token is not None and h.headers.get("Authorization") != f"Bearer {token}":
            self._error(h, 401 if h.headers.get("Authorization") is None else 403, "GatedRepo")
            return False
        return True

    def _revision_ok(self, repo: str, rev: str) -> bool:
        return rev in ("main", self.commits[repo])

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        with self.lock:
            self.log.append((h.command, path, h.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = "/".join(parts[2:4])
            rev = parts[5] if len(parts) >= 6 and parts[4] == "revision" else "main"
            if repo not in self.repos:  # a gated repo's listing is public, as on the hub; its files are not
                return self._error(h, 404, "RepoNotFound")
            if not self._revision_ok(repo, rev):
                return self._error(h, 404, "RevisionNotFound")
            files = self.repos[repo]
            gated = "manual" if repo in self.gated else False
            body = json.dumps({"id": repo, "sha": self.commits[repo], "private": False, "gated": gated,
                               "siblings": [self._sibling(repo, p, d) for p, d in sorted(files.items())]}).encode()  # fmt: skip
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            if not head:
                h.wfile.write(body)
            return
        if parts[0] == "cdn" and len(parts) >= 4:
            repo, file = "/".join(parts[1:3]), "/".join(parts[3:])
            data = self.repos.get(repo, {}).get(file)
            if data is None:
                return self._error(h, 404, None)
            return self._serve_file(h, repo, file, data, self.commits[repo], head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, rev, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            if not self._repo_access(h, repo):
                return
            commit = self.commits[repo]
            if not self._revision_ok(repo, rev):
                return self._error(h, 404, "RevisionNotFound")
            data = self.repos[repo].get(file)
            if data is None:
                return self._error(h, 404, "EntryNotFound", commit)
            target = self.redirect.get((repo, file))
            if target is not None and not head:
                h.send_response(302)
                h.send_header("Location", f"{target}/cdn/{repo}/{file}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            return self._serve_file(h, repo, file, data, commit, head)
        self._error(h, 404, None)

    def _serve_file(self, h, repo: str, file: str, data: bytes, commit: str, head: bool) -> None:
        lfs = self._is_lfs(file)
        etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_id(data)
        key = (repo, file)
        if not head:
            with self.lock:
                if self.tamper.get(key, 0) > 0:
                    self.tamper[key] -= 1
                    data = bytes(b ^ 0xFF for b in data)
        start, status = 0, 200
        rng = h.headers.get("Range")
        if rng and not head and rng.startswith("bytes="):
            start = int(rng[len("bytes=") :].split("-")[0])
            status = 206
        h.send_response(status)
        h.send_header("X-Repo-Commit", commit)
        h.send_header("ETag", f'"{etag}"')
        if lfs:
            h.send_header("X-Linked-Etag", f'"{etag}"')
            h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        if head:
            return
        body = data[start:]
        with self.lock:
            drop = key in self.drop_once and start == 0
            self.drop_once.discard(key)
        if drop:
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)  # SHUT_RDWR: the client sees the body end early
            return
        h.wfile.write(body)
