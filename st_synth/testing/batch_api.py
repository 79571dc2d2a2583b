"""The OpenAI files and batches API, served by :class:`~st_synth.testing.FakeOpenAIServer` for tests.

``POST /v1/files`` (multipart upload, purpose ``batch``), ``GET /v1/files/{id}`` and ``/content``;
``POST /v1/batches``, ``GET /v1/batches`` (newest first, ``after`` and ``limit``), ``GET /v1/batches/{id}``,
``POST /v1/batches/{id}/cancel``. A batch moves one step each time it is read: ``validating`` ->
``in_progress`` (half of its lines answered at the first read there, the rest at the next) -> ``finalizing``
-> its outcome. Each line is answered by the server's chat answer (so the chat ``faults`` queue applies to
lines too); as on OpenAI, lines answered 200 go to the output file, every other line to the error file.

Outcomes are taken in creation order from ``outcomes`` (then ``"completed"``):

* ``"completed"``: every line answered;
* ``"expired"`` / ``"cancelled"``: only the first half of the lines answered; the rest are in the error file
  with code ``batch_expired`` / ``batch_cancelled`` and no response (what OpenAI writes for them);
* ``"failed"``: validation fails, nothing is answered, ``errors`` says why.

``line_faults``: HTTP statuses (None: the normal answer) for the next lines run, in the order they run.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import threading
import time
from collections import Counter, deque
from typing import Any

TERMINAL = ("completed", "expired", "cancelled", "failed")
OUTCOMES = ("completed", "expired", "cancelled", "failed")


def _error(status: int, message: str) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": "invalid_request_error"}}


class FakeBatchAPI:
    def __init__(self, answer: Any) -> None:
        """``answer(body) -> (status, payload)``: how one request line is answered."""
        self._answer = answer
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.outcomes: deque[str] = deque()
        self.line_faults: deque[int | None] = deque()
        # Every line a batch ran (custom_id -> times): a request paid twice shows here as a count above 1.
        self.lines_run: Counter[str] = Counter()
        self.retrievals = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # -- routing ---------------------------------------------------------------------------------------
    def handles(self, path: str) -> bool:
        parts = path.split("?")[0].strip("/").split("/")
        return len(parts) >= 2 and parts[1] in ("files", "batches")

    def get(self, path: str) -> tuple[int, dict | bytes]:
        route, _, query = path.partition("?")
        parts = route.strip("/").split("/")[1:]  # drop "v1"
        with self._lock:
            if parts[0] == "files" and len(parts) == 2:
                return self._file(parts[1])
            if parts[0] == "files" and len(parts) == 3 and parts[2] == "content":
                status, file = self._file(parts[1])
                return (status, file) if status != 200 else (200, self.files[parts[1]]["content"])
            if parts[0] == "batches" and len(parts) == 1:
                return 200, self._list(dict(p.split("=", 1) for p in query.split("&") if "=" in p))
            if parts[0] == "batches" and len(parts) == 2:
                if parts[1] not in self.batches:
                    return _error(404, f"No batch with id {parts[1]}")
                self.retrievals += 1
                self._advance(self.batches[parts[1]])
                return 200, self._public(self.batches[parts[1]])
        return _error(404, f"Unknown path {route}")

    def post(self, path: str, content_type: str | None, data: bytes) -> tuple[int, dict]:
        parts = path.split("?")[0].strip("/").split("/")[1:]
        with self._lock:
            if parts == ["files"]:
                return self._upload(content_type, data)
            if parts == ["batches"]:
                try:
                    body = json.loads(data or b"{}")
                except json.JSONDecodeError:
                    return _error(400, "The body is not JSON.")
                return self._create(body)
            if parts[0] == "batches" and len(parts) == 3 and parts[2] == "cancel":
                batch = self.batches.get(parts[1])
                if batch is None:
                    return _error(404, f"No batch with id {parts[1]}")
                if batch["status"] not in TERMINAL:
                    batch["status"], batch["outcome"] = "cancelling", "cancelled"
                return 200, self._public(batch)
        return _error(404, f"Unknown path {path}")

    # -- files -----------------------------------------------------------------------------------------
    def _file(self, file_id: str) -> tuple[int, dict]:
        if file_id not in self.files:
            return _error(404, f"No file with id {file_id}")
        return 200, {k: v for k, v in self.files[file_id].items() if k != "content"}

    def _add_file(self, content: bytes, filename: str, purpose: str) -> str:
        file_id = f"file-{next(self._ids)}"
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                               "filename": filename, "purpose": purpose, "status": "processed", "content": content}  # fmt: skip
        return file_id

    def _upload(self, content_type: str | None, data: bytes) -> tuple[int, dict]:
        if not (content_type or "").startswith("multipart/form-data"):
            return _error(415, "A file upload is multipart/form-data.")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + data
        )
        fields = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        if "file" not in fields or "purpose" not in fields:
            return _error(400, "An upload needs the fields file and purpose.")
        purpose = fields["purpose"].get_content().strip()
        if purpose != "batch":
            return _error(400, f"This fake accepts purpose 'batch' only, not {purpose!r}.")
        content = fields["file"].get_payload(decode=True)
        return 200, self._file(self._add_file(content, fields["file"].get_filename() or "upload", purpose))[1]

    # -- batches ---------------------------------------------------------------------------------------
    def _create(self, body: dict) -> tuple[int, dict]:
        file = self.files.get(body.get("input_file_id", ""))
        if file is None:
            return _error(400, f"No file with id {body.get('input_file_id')!r}.")
        if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return _error(400, "endpoint must be /v1/chat/completions and completion_window 24h.")
        lines = [json.loads(line) for line in file["content"].decode().splitlines() if line.strip()]
        batch_id = f"batch_{next(self._ids)}"
        outcome = self.outcomes.popleft() if self.outcomes else "completed"
        if outcome not in OUTCOMES:
            raise ValueError(f"Unknown batch outcome {outcome!r}; one of {', '.join(OUTCOMES)}.")
        self.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": body["endpoint"], "input_file_id": file["id"],
            "completion_window": "24h", "status": "validating", "created_at": int(time.time()),
            "metadata": body.get("metadata") or None, "lines": lines, "outcome": outcome, "done": [],
            "output_file_id": None, "error_file_id": None, "errors": None,
        }  # fmt: skip
        return 200, self._public(self.batches[batch_id])

    def _list(self, query: dict[str, str]) -> dict:
        ordered = sorted(self.batches.values(), key=lambda b: int(b["id"].split("_")[1]), reverse=True)
        if after := query.get("after"):
            ordered = ordered[[b["id"] for b in ordered].index(after) + 1 :] if after in self.batches else []
        limit = int(query.get("limit", 20))
        page = ordered[:limit]
        return {"object": "list", "data": [self._public(b) for b in page], "has_more": len(ordered) > limit,
                "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}  # fmt: skip

    def _advance(self, batch: dict[str, Any]) -> None:
        status, lines = batch["status"], batch["lines"]
        if status == "validating":
            if batch["outcome"] == "failed":
                batch["status"] = "failed"
                batch["errors"] = {"object": "list", "data": [
                    {"code": "invalid_request", "message": "Injected validation failure.", "line": 1}]}  # fmt: skip
            else:
                batch["status"] = "in_progress"
        elif status == "in_progress":
            half = (len(lines) + 1) // 2
            if len(batch["done"]) < half:
                self._run(batch, lines[:half])
                if batch["outcome"] in ("expired", "cancelled"):
                    batch["status"] = "finalizing"
            else:
                self._run(batch, lines[half:])
                batch["status"] = "finalizing"
        elif status == "cancelling":
            batch["status"] = "finalizing"
        elif status == "finalizing":
            self._finish(batch)

    def _run(self, batch: dict[str, Any], lines: list[dict]) -> None:
        for line in lines:
            key = line["custom_id"]
            self.lines_run[key] += 1
            status = self.line_faults.popleft() if self.line_faults else None
            if status is not None:
                payload = {"error": {"message": f"injected {status}"}}
            else:
                status, payload = self._answer(line["body"])
            batch["done"].append({"id": f"batch_req_{key[:12]}", "custom_id": key, "error": None,
                                  "response": {"status_code": status, "request_id": f"req_{key[:8]}",
                                               "body": payload}})  # fmt: skip

    def _finish(self, batch: dict[str, Any]) -> None:
        outcome = batch["outcome"]
        done = {entry["custom_id"] for entry in batch["done"]}
        unrun = [
            {"id": f"batch_req_{line['custom_id'][:12]}", "custom_id": line["custom_id"], "response": None,
             "error": {"code": f"batch_{outcome}", "message": "This line was not executed."}}
            for line in batch["lines"] if line["custom_id"] not in done
        ]  # fmt: skip
        good = [entry for entry in batch["done"] if entry["response"]["status_code"] == 200]
        bad = [entry for entry in batch["done"] if entry["response"]["status_code"] != 200] + unrun

        def write(entries: list[dict], name: str) -> str | None:
            if not entries:
                return None
            content = "".join(json.dumps(entry) + "\n" for entry in reversed(entries)).encode()
            return self._add_file(content, f"{batch['id']}_{name}.jsonl", "batch_output")

        batch["output_file_id"], batch["error_file_id"] = write(good, "output"), write(bad, "error")
        batch["status"] = outcome

    def _public(self, batch: dict[str, Any]) -> dict:
        failed = sum(1 for entry in batch["done"] if entry["response"]["status_code"] != 200)
        return {
            **{k: v for k, v in batch.items() if k not in ("lines", "outcome", "done")},
            "request_counts": {"total": len(batch["lines"]), "completed": len(batch["done"]) - failed,
                               "failed": failed},
        }  # fmt: skip
