"""A fake Hugging Face Hub on 127.0.0.1 with the endpoints huggingface_hub 2.x uses to push a folder.

    POST /api/repos/create                               create_repo (409 when it exists)
    POST /api/validate-yaml                              README.md front matter (must be a YAML mapping)
    GET  /api/models/{org}/{name}[/revision/{rev}]       repo_info (branch head)
    POST /api/models/{org}/{name}/branch/{branch}        create_branch
    POST /api/models/{org}/{name}/preupload/{rev}        every file is "regular" (inline in the commit)
    POST /api/models/{org}/{name}/commit/{rev}           NDJSON: header + base64 files -> a new commit

Tokens: WRITE_TOKEN may write everywhere, READ_TOKEN may only read (403 on writes), anything
else is rejected with 401 like the Hub ("Invalid credentials in Authorization header").
`repos[repo_id][branch]` holds the committed files as bytes; `requests` logs every call.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

WRITE_TOKEN = "hf_fakeWriteToken0123456789abcdefABCDEF"
READ_TOKEN = "hf_fakeReadToken0123456789abcdefABCDEF"
REPO = r"(?P<repo>[^/]+/[^/]+)"


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}  # repo -> branch -> files
        self.heads: dict[str, dict[str, str]] = {}  # repo -> branch -> commit sha
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str) -> None:
        self.repos[repo_id] = {"main": {".gitattributes": b"*.safetensors filter=lfs\n"}}
        self.heads[repo_id] = {"main": hashlib.sha1(repo_id.encode()).hexdigest()}

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, body: dict | None = None, headers: dict | None = None) -> None:
                data = json.dumps(body or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def _auth(self, write: bool) -> bool:
                token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                if token not in (WRITE_TOKEN, READ_TOKEN):
                    self._send(401, {"error": "Invalid credentials in Authorization header"},
                               {"X-Error-Message": "Invalid credentials in Authorization header"})
                    return False
                if write and token != WRITE_TOKEN:
                    self._send(403, {"error": "You don't have the rights to create a model under this namespace"},
                               {"X-Error-Message": "You don't have the rights to create a model under this namespace"})
                    return False
                return True

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self) -> None:
                hub.requests.append(("GET", self.path))
                match = re.fullmatch(rf"/api/models/{REPO}(/revision/(?P<rev>[^/?]+))?(\?.*)?", self.path)
                if not match:
                    return self._send(404, {"error": "not found"})
                if not self._auth(write=False):
                    return
                repo, rev = match["repo"], match["rev"] or "main"
                if repo not in hub.repos:
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                if rev not in hub.heads[repo]:
                    return self._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
                self._send(200, {"id": repo, "sha": hub.heads[repo][rev], "private": False,
                                 "siblings": [{"rfilename": f} for f in hub.repos[repo][rev]]})

            def do_POST(self) -> None:
                hub.requests.append(("POST", self.path))
                body = self._body()
                if self.path == "/api/validate-yaml":
                    content = json.loads(body)["content"]
                    try:
                        front = yaml.safe_load(content.split("---\n")[1]) if content.startswith("---\n") else {}
                        assert isinstance(front, dict)
                    except Exception:
                        return self._send(400, {"errors": [{"message": "invalid YAML front matter"}]})
                    return self._send(200, {"warnings": []})
                if self.path == "/api/repos/create":
                    if not self._auth(write=True):
                        return
                    payload = json.loads(body)
                    repo = f"{payload['organization']}/{payload['name']}"
                    if repo in hub.repos:
                        return self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"})
                    hub.add_repo(repo)
                    return self._send(200, {"url": f"{hub.url}/{repo}"})
                match = re.fullmatch(rf"/api/models/{REPO}/(?P<op>branch|preupload|commit)/(?P<rev>[^/?]+)(\?.*)?", self.path)
                if not match:
                    return self._send(404, {"error": "not found"})
                if not self._auth(write=True):
                    return
                repo, op, rev = match["repo"], match["op"], match["rev"]
                if repo not in hub.repos:
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                if op == "branch":
                    if rev in hub.heads[repo]:
                        return self._send(409, {"error": "Reference already exists"})
                    hub.repos[repo][rev] = dict(hub.repos[repo]["main"])
                    hub.heads[repo][rev] = hub.heads[repo]["main"]
                    return self._send(200, {})
                if rev not in hub.heads[repo]:
                    return self._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
                if op == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                      for f in files]})
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                files = dict(hub.repos[repo][rev])
                for line in lines:
                    if line["key"] == "file":
                        files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                    elif line["key"] != "header":
                        return self._send(400, {"error": f"unsupported commit entry {line['key']}"})
                sha = hashlib.sha1(f"{repo}@{rev}#{len(hub.commits)}".encode() + body).hexdigest()
                hub.repos[repo][rev] = files
                hub.heads[repo][rev] = sha
                hub.commits.append({"repo": repo, "branch": rev, "message": lines[0]["value"]["summary"], "sha": sha})
                self._send(200, {"commitUrl": f"{hub.url}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

        return Handler
