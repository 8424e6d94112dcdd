"""The child-process protocol: a JSON request in, one JSON answer or error out."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vtpmctl.childproc import ChildError, child_env, run_child

SERVE = (
    "import sys; from vtpmctl.childproc import serve_child\n"
    "def handle(request):\n"
    "    print('stray output goes to the log')\n"
    "    if request.get('fail'):\n"
    "        from vtpmctl.errors import UsageError\n"
    "        raise UsageError('bad\\n  request')\n"
    "    if request.get('crash'):\n"
    "        raise KeyError('secret')\n"
    "    return {'echo': request}\n"
    "sys.exit(serve_child(handle))\n"
)


def _serve(request: object) -> tuple[int, dict[str, object], str]:
    done = subprocess.run(
        [sys.executable, "-c", SERVE],
        input=json.dumps(request).encode(),
        capture_output=True,
        env=child_env(),
        timeout=60,
        check=False,
    )
    return done.returncode, json.loads(done.stdout), done.stderr.decode()


def test_an_answer_is_the_only_thing_on_stdout() -> None:
    code, reply, log = _serve({"x": 1})
    assert (code, reply) == (0, {"answer": {"echo": {"x": 1}}})
    assert "stray output" in log


def test_an_error_is_its_class_branch_and_one_line() -> None:
    code, reply, _ = _serve({"fail": True})
    assert code == 1
    assert reply == {
        "error": {"class": "UsageError", "branch": "UsageError", "message": "bad request"}
    }
    code, reply, log = _serve({"crash": True})
    assert reply == {"error": {"class": "KeyError", "branch": "", "message": "'secret'"}}
    assert "Traceback" not in log


def test_the_parent_raises_the_childs_error_with_its_exit_code() -> None:
    with pytest.raises(ChildError) as info:
        run_child("_manufacture", {"tpm2": True}, timeout=60)
    err = info.value
    assert (err.kind, err.branch, str(err)) == (
        "ManufactureError",
        "EngineError",
        "no state dir in the request",
    )
    assert err.exit_code == 1


def test_an_answer_comes_back_with_the_log() -> None:
    reply = run_child("_inspect", {"tpm2": True, "blobs": {}}, timeout=60)
    assert reply.answer["ok"] is False and reply.answer["error"] == "no state blobs given"


def test_unknown_entry_points_are_refused() -> None:
    with pytest.raises(ValueError):
        run_child("_bogus", {}, timeout=1)
