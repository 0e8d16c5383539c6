"""A local HTTP server that answers ``huggingface_hub`` as the Hugging Face Hub does (for tests, no network).

It implements what the installed client calls to fetch model files:

* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: the model info (``sha``, ``siblings``
  with ``size``, ``blobId`` and ``lfs.sha256`` when ``?blobs=True``, ``gated``, ``private``);
* ``HEAD`` / ``GET /{repo}/resolve/{rev}/{file}``: ``X-Repo-Commit`` on every answer; a small (git) file is
  served with ``ETag`` = its git blob id; an LFS file (weights) answers ``302`` to a CDN address on another
  host name (``localhost`` instead of ``127.0.0.1``) with ``X-Linked-Etag`` = its SHA-256 and ``X-Linked-Size``,
  as the Hub redirects to its storage; the client must not send the token there;
* errors with the ``X-Error-Code`` header ``hf_raise_for_status`` reads: ``RepoNotFound`` (401 without a token,
  404 with one, as the Hub hides private repositories), ``GatedRepo`` (401 without a token, 403 with a token
  that has no access), ``RevisionNotFound`` and ``EntryNotFound`` (404).

Every request is logged in :attr:`FakeHub.requests` (method, path, Authorization header) so tests can assert
that a cache hit made none.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".h5", ".msgpack")


@dataclass
class Repo:
    """One model repository: commits (oldest first), named refs (branches and tags) and access rules."""

    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)  # (sha, {file: content})
    refs: dict[str, str] = field(default_factory=dict)  # "main" / "v1.0" -> commit sha
    gated: bool = False  # files need a token of ``tokens``; the model info stays public (as on the Hub)
    private: bool = False  # everything needs a token of ``tokens``; others see "not found"
    tokens: frozenset[str] = frozenset()  # tokens with access

    def commit(self, files: dict[str, bytes], *, branch: str = "main", tag: str | None = None) -> str:
        """Add a commit holding ``files`` (the whole tree) on ``branch``; returns its sha."""
        sha = hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode())
        sha.update(str(len(self.commits)).encode())
        commit = sha.hexdigest()
        self.commits.append((commit, dict(files)))
        self.refs[branch] = commit
        if tag is not None:
            self.refs[tag] = commit
        return commit

    def tree(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """The commit a branch, tag or full sha names, with its files; None when it names none."""
        sha = self.refs.get(revision, revision)
        return next(((c, files) for c, files in self.commits if c == sha), None)


def git_blob_id(content: bytes) -> str:
    """The git object id of a file (what the Hub serves as the ETag of a non-LFS file)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def is_lfs(name: str) -> bool:
    return name.endswith(_LFS_SUFFIXES)


class FakeHub:
    """The server: ``repos`` by id, started on 127.0.0.1 at a free port (``url``)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def add(self, repo_id: str, repo: Repo) -> Repo:
        self.repos[repo_id] = repo
        return repo

    def blob(self, sha256: str) -> bytes | None:
        """The LFS file with this SHA-256 in any repository (what the storage host serves), or None."""
        for repo in self.repos.values():
            for _, files in repo.commits:
                for name, content in files.items():
                    if is_lfs(name) and hashlib.sha256(content).hexdigest() == sha256:
                        return content
        return None

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file of a folder (e.g. a ``save_pretrained`` output) by its relative name."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            return

        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def _send(self, status: int, headers: dict[str, str], content: bytes = b"", body: bool = True) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if body and content:
                self.wfile.write(content)

        def _error(self, status: int, code: str, message: str, body: bool, commit: str | None = None) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
            if commit is not None:
                headers["X-Repo-Commit"] = commit
            self._send(status, headers, json.dumps({"error": message}).encode(), body)

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization")
            return auth.removeprefix("Bearer ").strip() if auth else None

        def _answer(self, body: bool) -> None:
            path = urlsplit(self.path).path
            hub.requests.append((self.command, path, self.headers.get("Authorization")))
            if path.startswith("/cdn/"):
                content = hub.blob(path.removeprefix("/cdn/"))
                if content is None:
                    return self._send(404, {}, b"", body)
                return self._send(200, {"Content-Type": "application/octet-stream"}, content, body)
            if path.startswith("/api/models/"):
                return self._info(path.removeprefix("/api/models/"), body)
            parts = path.lstrip("/").split("/")
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve("/".join(parts[:2]), unquote(parts[3]), unquote("/".join(parts[4:])), body)
            self._send(404, {}, b"", body)

        def _access(self, repo_id: str, body: bool, files: bool) -> Repo | None:
            """The repository when the request may see it; else the Hub's error is sent and None returned."""
            repo = hub.repos.get(repo_id)
            token = self._token()
            if repo is None or (repo.private and token not in repo.tokens):
                status = 404 if token else 401
                self._error(status, "RepoNotFound", "Repository not found", body)
                return None
            if files and repo.gated and token not in repo.tokens:
                status = 403 if token else 401
                message = f"Access to model {repo_id} is restricted and you are not in the authorized list."
                self._error(status, "GatedRepo", message, body)
                return None
            return repo

        def _info(self, rest: str, body: bool) -> None:
            repo_id, _, revision = rest.partition("/revision/")
            repo = self._access(repo_id, body, files=False)
            if repo is None:
                return
            tree = repo.tree(unquote(revision) if revision else "main")
            if tree is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(revision)}", body)
            commit, files = tree
            siblings = []
            for name, content in sorted(files.items()):
                sibling: dict[str, object] = {"rfilename": name, "size": len(content), "blobId": git_blob_id(content)}
                if is_lfs(name):
                    sha256 = hashlib.sha256(content).hexdigest()
                    sibling["lfs"] = {"sha256": sha256, "size": len(content), "pointerSize": 134}
                siblings.append(sibling)
            info = {"id": repo_id, "sha": commit, "siblings": siblings, "private": repo.private}
            info["gated"] = "manual" if repo.gated else False
            self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)

        def _resolve(self, repo_id: str, revision: str, name: str, body: bool) -> None:
            repo = self._access(repo_id, body, files=True)
            if repo is None:
                return
            tree = repo.tree(revision)
            if tree is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
            commit, files = tree
            if name not in files:
                return self._error(404, "EntryNotFound", f'{name} does not exist on "{revision}"', body, commit)
            content = files[name]
            if is_lfs(name):
                sha256 = hashlib.sha256(content).hexdigest()
                headers = {
                    "X-Repo-Commit": commit,
                    "X-Linked-Etag": f'"{sha256}"',
                    "X-Linked-Size": str(len(content)),
                    "Location": f"http://localhost:{hub.port}/cdn/{sha256}",
                }
                return self._send(302, headers, b"", body)
            headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(content)}"'}
            self._send(200, headers, content, body)

    return Handler
