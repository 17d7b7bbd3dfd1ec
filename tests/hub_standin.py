"""A stand-in Hugging Face Hub for the tests: a threaded http.server that answers the requests huggingface_hub 2.4
makes in `snapshot_download`, so that the real client runs against it (HF_ENDPOINT=hub.url), as it would against
huggingface.co. It also serves a PEP 503 package index, for pip.

What it speaks, as huggingface.co does (read from huggingface_hub's hf_api.py, file_download.py and utils/_http.py):
- GET  /api/models/<org>/<name>[/revision/<rev>]  -> {"id", "sha", "siblings": [{"rfilename"}], "gated", "private"}
- GET  /api/models/<org>/<name>/tree/<rev>[/<path>]  -> [{"type": "file"|"directory", "oid", "size", "path", "lfs"}]
- HEAD/GET /<org>/<name>/resolve/<rev>/<path>: a small file answers itself, with ETag (its git blob id) and
  X-Repo-Commit; a large (LFS) file answers 302 to the CDN with X-Linked-Etag (its sha256), X-Linked-Size and
  X-Repo-Commit, since huggingface_hub reads a cross-host redirect's headers instead of following it.
- HEAD/GET /lfs/<sha256> on the CDN (a second port, so another origin: the client drops the token there), with
  Range (206, Content-Range).
- Errors with X-Error-Code, which huggingface_hub turns into its exception classes: RepoNotFound (401: a missing
  repo, or a private one without a token), GatedRepo (401 without a token, 403 with one that lacks access: on
  resolve, as the real Hub lets anyone read a gated repo's info and file list), EntryNotFound, RevisionNotFound.
  Any other path is a plain 404, as a web server that is not a Hub answers.
- GET /simple/<project>/ and /files/<wheel>: a package index, for `pip download` (PIP_INDEX_URL=hub.url/simple/).
- A request line in absolute form (`GET http://host/path HTTP/1.1`), as a forward proxy receives it, is served like
  its path and logged with proxied=True: the stand-in is also the proxy of the proxy tests.

Every request is logged (hub.log). Faults, set per repo file: `drop[path] = (n_bytes, times)` closes the connection
after n bytes of the next `times` downloads; `fail_range[path] = status` answers a Range request with that status;
`pause[path] = n_bytes` sends n bytes, sets hub.paused and waits for hub.release.
"""

import hashlib
import html
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".pth", ".bin", ".model", ".gguf", ".onnx")  # as the Hub's default .gitattributes
CHUNK = 1 << 20
_sha256_cache = {}  # (path, size, mtime) -> hex digest: the real SmolLM2 weights are hashed once per session


def sha256_of(content):
    if isinstance(content, bytes):
        return hashlib.sha256(content).hexdigest()
    stat = content.stat()
    key = (str(content), stat.st_size, stat.st_mtime_ns)
    if key not in _sha256_cache:
        h = hashlib.sha256()
        with open(content, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        _sha256_cache[key] = h.hexdigest()
    return _sha256_cache[key]


@dataclass
class RepoFile:
    content: bytes | Path  # served from memory, or read from disk by path (never copied)
    size: int
    lfs: bool
    oid: str  # git blob id (of the LFS pointer, for an LFS file)
    sha256: str | None  # LFS files only


@dataclass
class Repo:
    files: dict
    sha: str
    gated: bool = False
    allowed_tokens: set = field(default_factory=set)  # tokens with access to a gated repo


@dataclass
class Request:
    method: str
    path: str
    proxied: bool
    host: str
    range: str | None
    auth: str | None


class Hub:
    def __init__(self):
        self.repos, self.wheels, self.log = {}, {}, []
        self.drop, self.fail_range, self.pause = {}, {}, {}
        self.paused, self.release = threading.Event(), threading.Event()
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler) for _ in range(2)]  # the Hub and the CDN
        for server in self.servers:
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.servers[0].server_port}"
        self.cdn_url = f"http://127.0.0.1:{self.servers[1].server_port}"  # tests behind a proxy rename it

    def close(self):
        self.release.set()
        for server in self.servers:
            server.shutdown()
            server.server_close()

    def add_repo(self, repo_id, files, gated=False, allowed_tokens=()):
        """files: {path in the repo: bytes or a local Path}."""
        entries = {}
        for path, content in files.items():
            size = len(content) if isinstance(content, bytes) else content.stat().st_size
            lfs = path.endswith(LFS_SUFFIXES)
            sha256 = sha256_of(content) if lfs else None
            blob = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode() if lfs \
                else content if isinstance(content, bytes) else content.read_bytes()
            oid = hashlib.sha1(b"blob %d\0" % len(blob) + blob).hexdigest()
            entries[path] = RepoFile(content, size, lfs, oid, sha256)
        sha = hashlib.sha1(json.dumps(sorted((p, f.oid) for p, f in entries.items())).encode()).hexdigest()
        self.repos[repo_id] = Repo(entries, sha, gated, set(allowed_tokens))
        return self.repos[repo_id]

    def add_wheel(self, project, wheel: Path):
        canonical = re.sub(r"[-_.]+", "-", project).lower()
        self.wheels.setdefault(canonical, {})[wheel.name] = wheel

    def requests(self, kind=None):
        """The logged requests, of one kind: 'api', 'resolve', 'lfs', 'simple' (None: all)."""
        with self.lock:
            log = list(self.log)
        return [r for r in log if kind is None or _kind(r.path) == kind]

    def clear(self):
        with self.lock:
            self.log.clear()


def _kind(path):
    if path.startswith("/api/"):
        return "api"
    if path.startswith("/lfs/"):
        return "lfs"
    if path.startswith(("/simple/", "/files/")):
        return "simple"
    return "resolve" if "/resolve/" in path else "other"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's httpx2 client expects
    hub: Hub

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.answer(head=False)

    def do_HEAD(self):
        self.answer(head=True)

    # -- plumbing

    def send(self, status, body=b"", headers=None, head=False, content_type="application/json"):
        self.send_response(status)
        for k, v in {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def error(self, status, code=None, message="", head=False):
        headers = {"X-Error-Code": code, "X-Error-Message": message} if code else {}
        body = json.dumps({"error": message}).encode() if code else b"<html><body>Not Found</body></html>"
        self.send(status, body, headers, head, "application/json" if code else "text/html")

    def answer(self, head):
        target = self.path
        proxied = target.startswith(("http://", "https://"))  # absolute form: we are someone's proxy
        url = urlsplit(target if proxied else "http://" + (self.headers.get("Host") or "") + target)
        auth = self.headers.get("Authorization")
        with self.hub.lock:
            self.hub.log.append(Request(self.command, url.path, proxied, url.netloc, self.headers.get("Range"), auth))
        try:
            self.route(unquote(url.path), parse_qs(url.query), head, auth)
        except (BrokenPipeError, ConnectionResetError):  # the client went away (a test interrupted it)
            self.close_connection = True

    def route(self, path, query, head, auth):
        hub = self.hub
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            return self.model_info(m[1], m[2] or "main", head)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
            return self.tree(m[1], m[2], m[3] or "", head)
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self.resolve(m[1], m[2], m[3], head, auth)
        if m := re.fullmatch(r"/lfs/([0-9a-f]{64})", path):
            found = [(p, f) for repo in hub.repos.values() for p, f in repo.files.items() if f.sha256 == m[1]]
            return self.content(*found[0], head) if found else self.error(404, head=head)
        if m := re.fullmatch(r"/simple/([^/]+)/?", path):
            links = "".join(f'<a href="/files/{quote(n)}#sha256={sha256_of(w)}">{html.escape(n)}</a><br>\n'
                            for n, w in hub.wheels.get(m[1], {}).items())
            if not links:
                return self.error(404, head=head)
            return self.send(200, f"<html><body>\n{links}</body></html>".encode(), head=head, content_type="text/html")
        if m := re.fullmatch(r"/files/([^/]+)", path):
            wheel = next((w for ws in hub.wheels.values() for n, w in ws.items() if n == m[1]), None)
            if wheel is None:
                return self.error(404, head=head)
            return self.send(200, wheel.read_bytes(), head=head, content_type="application/octet-stream")
        return self.error(404, head=head)

    # -- the Hub API

    def repo(self, repo_id, head):
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self.error(401, "RepoNotFound", "Repository not found", head)
        return repo

    def model_info(self, repo_id, revision, head):
        if (repo := self.repo(repo_id, head)) is None:
            return
        if revision not in ("main", repo.sha):
            return self.error(404, "RevisionNotFound", "Invalid rev id: " + revision, head)
        info = {"_id": repo.sha[:24], "id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
                "gated": "manual" if repo.gated else False, "disabled": False, "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(repo.files)]}
        self.send(200, json.dumps(info).encode(), head=head)

    def tree(self, repo_id, revision, prefix, head):
        if (repo := self.repo(repo_id, head)) is None:
            return
        if revision not in ("main", repo.sha):
            return self.error(404, "RevisionNotFound", "Invalid rev id: " + revision, head)
        entries, folders = [], set()
        for path, f in sorted(repo.files.items()):
            if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                continue
            parts = path.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
            entry = {"type": "file", "oid": f.oid, "size": f.size, "path": path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                    for d in sorted(folders)]
        self.send(200, json.dumps(entries).encode(), head=head)

    def resolve(self, repo_id, revision, path, head, auth):
        if (repo := self.repo(repo_id, head)) is None:
            return
        if revision not in ("main", repo.sha):
            return self.error(404, "RevisionNotFound", "Invalid rev id: " + revision, head)
        if repo.gated:
            token = auth.removeprefix("Bearer ") if auth else None
            if token is None:
                return self.error(401, "GatedRepo", "Access to this gated repo is restricted.", head)
            if token not in repo.allowed_tokens:
                return self.error(403, "GatedRepo", "Your request to access this repo is awaiting review.", head)
        f = repo.files.get(path)
        if f is None:
            return self.error(404, "EntryNotFound", "Entry not found", head)
        if f.lfs:
            location = f"{self.hub.cdn_url}/lfs/{f.sha256}"
            return self.send(302, b"", {"Location": location, "X-Repo-Commit": repo.sha, "ETag": f'"{f.oid}"',
                                        "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)}, head)
        self.content(path, f, head, {"X-Repo-Commit": repo.sha, "ETag": f'"{f.oid}"'})

    def content(self, path, f, head, headers=None):
        """The bytes of one file, whole or from a Range, with the faults the test set for it."""
        hub, start, end = self.hub, 0, f.size - 1
        if self.headers.get("Range"):
            if path in hub.fail_range:
                return self.error(hub.fail_range[path], head=head)
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers["Range"])
            start, end = int(m[1]), int(m[2]) if m[2] else f.size - 1
        headers = {**(headers or {}), "Accept-Ranges": "bytes", "ETag": f'"{f.sha256 or f.oid}"'}
        status = 200
        if (start, end) != (0, f.size - 1):
            status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{f.size}"
        self.send_response(status)
        for k, v in {"Content-Type": "application/octet-stream", "Content-Length": str(end + 1 - start),
                     **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        if head:
            return
        cut = None
        with hub.lock:
            if path in hub.drop and hub.drop[path][1] > 0:
                cut, times = hub.drop[path]
                hub.drop[path] = (cut, times - 1)
        pause = hub.pause.get(path)
        sent = 0
        for chunk in _chunks(f.content, start, end + 1):
            if pause is not None and sent + len(chunk) >= pause:
                self.wfile.write(chunk[:pause - sent])
                self.wfile.flush()
                hub.paused.set()
                hub.release.wait(60)
                self.close_connection = True
                return
            if cut is not None and sent + len(chunk) >= cut:
                self.wfile.write(chunk[:cut - sent])
                self.wfile.flush()
                self.close_connection = True  # Content-Length promised more: the client sees the body cut short
                return
            self.wfile.write(chunk)
            sent += len(chunk)


def _chunks(content, start, stop):
    if isinstance(content, bytes):
        for i in range(start, stop, CHUNK):
            yield content[i:min(i + CHUNK, stop)]
        return
    with open(content, "rb") as f:
        f.seek(start)
        left = stop - start
        while left > 0 and (chunk := f.read(min(CHUNK, left))):
            left -= len(chunk)
            yield chunk
