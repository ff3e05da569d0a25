"""A loopback fake Hugging Face Hub for testing `push_to_hub` and downloads offline.

It speaks the endpoints the unmodified `huggingface_hub` client uses to create a repository, commit files inline
(no LFS / xet), read repository info and trees, and resolve files, and stores each repository as a plain folder
(`<root>/<type>s/<org>/<name>/...`). It binds 127.0.0.1 only and never reaches the network.

`HF_ENDPOINT` is read when `huggingface_hub` is imported, so start the server and set the variable first:

```python
>>> from hf_mlsafety.testing_hub import FakeHub
>>> import tempfile
>>> hub = FakeHub(root=tempfile.mkdtemp()).start()
>>> import os; os.environ["HF_ENDPOINT"] = hub.endpoint   # before importing huggingface_hub / transformers
```

`hub.fail_next_commits = 1` makes the next commit answer HTTP 500 (to test failed pushes). Limits: one branch, no
history, `revision` ignored, no authentication (any token is accepted).
"""

import base64
import hashlib
import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


USER = "hf-mlsafety-tester"
_SHA_FILE = ".fake_hub_sha"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep test output clean
        pass

    # --- plumbing --------------------------------------------------------------------------------------------

    @property
    def hub(self):
        return self.server.hub

    def _send(self, status, body=b"", headers=None, content_type="application/json"):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status, message, code=None):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _body(self):
        return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

    def _path(self):
        return unquote(urlsplit(self.path).path)

    # --- routes ----------------------------------------------------------------------------------------------

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        parts = self._path().strip("/").split("/")
        if parts[:2] == ["api", "whoami-v2"]:
            return self._send(200, {"type": "user", "name": USER, "orgs": [{"name": "org"}],
                                    "auth": {"accessToken": {"role": "write"}}})
        if len(parts) >= 4 and parts[0] == "api" and parts[1] in ("models", "datasets", "spaces"):
            repo_type, repo_id, rest = parts[1][:-1], "/".join(parts[2:4]), parts[4:]
            folder = self.hub.repo_folder(repo_type, repo_id)
            if not os.path.isdir(folder):
                return self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
            if rest[:1] == ["tree"]:
                prefix = "/".join(rest[2:])
                files = [
                    {"type": "file", "path": path, "size": os.path.getsize(os.path.join(folder, path)),
                     "oid": self.hub.file_oid(folder, path)}
                    for path in self.hub.list_files(folder)
                    if not prefix or path == prefix or path.startswith(prefix + "/")
                ]
                return self._send(200, files)
            sha = self.hub.sha(folder)
            return self._send(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False, "tags": [],
                                    "siblings": [{"rfilename": path} for path in self.hub.list_files(folder)]})
        repo_type = "model"
        if parts[0] in ("datasets", "spaces"):
            repo_type, parts = parts[0][:-1], parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, filename = "/".join(parts[:2]), "/".join(parts[4:])
            folder = self.hub.repo_folder(repo_type, repo_id)
            if not os.path.isdir(folder):
                return self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
            path = os.path.join(folder, filename)
            if not os.path.isfile(path) or filename == _SHA_FILE:
                return self._error(404, f"Entry {filename} not found", "EntryNotFound")
            with open(path, "rb") as handle:
                data = handle.read()
            return self._send(200, data, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                          "X-Repo-Commit": self.hub.sha(folder), "Accept-Ranges": "bytes"},
                              content_type="application/octet-stream")
        return self._error(404, f"Not found: {self._path()}")

    def do_POST(self):
        parts = self._path().strip("/").split("/")
        body = self._body()
        if parts == ["api", "repos", "create"]:
            request = json.loads(body or b"{}")
            repo_type = request.get("type") or "model"
            repo_id = f"{request.get('organization') or USER}/{request['name']}"
            url = f"{self.hub.endpoint}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
            folder = self.hub.repo_folder(repo_type, repo_id)
            if os.path.isdir(folder):
                return self._send(409, {"error": "You already created this repo", "url": url},
                                  {"X-Error-Message": "You already created this repo"})
            os.makedirs(folder)
            self.hub.set_sha(folder, hashlib.sha1(repo_id.encode()).hexdigest())
            return self._send(200, {"url": url, "name": repo_id})
        if parts == ["api", "validate-yaml"]:
            return self._send(200, {"errors": [], "warnings": []})
        if len(parts) >= 6 and parts[0] == "api" and parts[1] in ("models", "datasets", "spaces"):
            repo_type, repo_id, action = parts[1][:-1], "/".join(parts[2:4]), parts[4]
            folder = self.hub.repo_folder(repo_type, repo_id)
            if not os.path.isdir(folder):
                return self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                                   "oid": None} for f in files]})
            if action == "commit":
                return self._commit(folder, repo_id, body)
        return self._error(404, f"Not found: {self._path()}")

    def _commit(self, folder, repo_id, body):
        with self.hub.lock:
            if self.hub.fail_next_commits > 0:
                self.hub.fail_next_commits -= 1
                return self._error(500, "Internal Server Error (injected by the fake Hub)")
            operations = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            summary = ""
            for operation in operations:
                key, value = operation["key"], operation["value"]
                if key == "header":
                    summary = value.get("summary", "")
                elif key == "file":
                    path = os.path.join(folder, value["path"])
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "wb") as handle:
                        handle.write(base64.b64decode(value["content"]))
                elif key == "deletedFile":
                    path = os.path.join(folder, value["path"])
                    if os.path.isfile(path):
                        os.remove(path)
                else:
                    return self._error(400, f"Unsupported commit operation {key!r} (the fake Hub takes inline files)")
            self.hub.commits.append({"repo_id": repo_id, "summary": summary,
                                     "files": [op["value"]["path"] for op in operations if op["key"] == "file"]})
            sha = hashlib.sha1(f"{self.hub.sha(folder)}{summary}{len(self.hub.commits)}".encode()).hexdigest()
            self.hub.set_sha(folder, sha)
        return self._send(200, {"commitOid": sha, "commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{sha}",
                                "success": True})


class FakeHub:
    """A fake Hub on 127.0.0.1 serving repositories stored under `root`.

    Args:
        root (`str`):
            Folder holding the repositories.
        port (`int`, *optional*, defaults to `0`):
            Port to bind on 127.0.0.1; 0 picks a free one.
    """

    def __init__(self, root, port=0):
        self.root = root
        self.port = port
        self.lock = threading.Lock()
        self.fail_next_commits = 0
        self.commits = []
        self._server = None

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def repo_folder(self, repo_type, repo_id):
        return os.path.join(self.root, f"{repo_type}s", *repo_id.split("/"))

    def list_files(self, folder):
        files = []
        for directory, _, names in os.walk(folder):
            for name in names:
                path = os.path.relpath(os.path.join(directory, name), folder).replace(os.sep, "/")
                if path != _SHA_FILE:
                    files.append(path)
        return sorted(files)

    def file_oid(self, folder, path):
        with open(os.path.join(folder, path), "rb") as handle:
            return hashlib.sha1(handle.read()).hexdigest()

    def sha(self, folder):
        with open(os.path.join(folder, _SHA_FILE)) as handle:
            return handle.read().strip()

    def set_sha(self, folder, sha):
        with open(os.path.join(folder, _SHA_FILE), "w") as handle:
            handle.write(sha)

    def clear(self):
        """Deletes every repository (between tests)."""
        shutil.rmtree(self.root, ignore_errors=True)
        os.makedirs(self.root, exist_ok=True)
        self.commits.clear()
        self.fail_next_commits = 0
