"""`python import_recorder.py OUT.json ARGV...`: run `clipworks ARGV...` in this process, then write to OUT.json its
exit status, every import a clipworks module made ([module, line, name imported], whether or not the imported module
was loaded already), and the top-level names of all the modules loaded by the end.

tests/test_packaging.py runs each command under it. It imports only the standard library before the command, so
that what is loaded at the end is what the command loaded. Two commands get help: `models` lists one preset of
each family (every kind of tower, in seconds rather than the twenty its full list takes), and `serve` gets a
client thread that sends each kind of request once, keeps the answers (OUT.json's "answers"), then stops the
server as Ctrl-C does.
"""

import builtins
import importlib
import json
import sys

out_path, argv = sys.argv[1], sys.argv[2:]
imports = set()


def _note(frame, name: str) -> None:
    importer = frame.f_globals.get("__name__") or ""
    if (importer == "clipworks" or importer.startswith("clipworks.")) and not name.startswith("."):
        imports.add((importer, frame.f_lineno, name))


def _import(name, globals=None, locals=None, fromlist=(), level=0, _real=builtins.__import__):
    if level == 0:  # absolute: `import x`, `from x import y` (a relative import stays inside clipworks)
        _note(sys._getframe(1), name)
    return _real(name, globals, locals, fromlist, level)


def _import_module(name, package=None, _real=importlib.import_module):
    _note(sys._getframe(1), name)
    return _real(name, package)


builtins.__import__, importlib.import_module = _import, _import_module
answers = {}

if argv[0] == "models":
    import clipworks.pretrained  # noqa: F401  (its registry reads every preset once, at import)
    from clipworks.presets import PRESETS, preset_family

    firsts = {preset_family(name): name for name in sorted(PRESETS, reverse=True)}
    for name in set(PRESETS) - set(firsts.values()):
        del PRESETS[name]

if argv[0] == "serve":
    import http.client
    import os
    import signal
    import threading
    import time

    def _ask(method: str, path: str, body=None, headers=None) -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", int(argv[argv.index("--port") + 1]), timeout=60)
        conn.request(method, path, body, headers or {})
        response = conn.getresponse()
        data = response.read()
        answers[f"{method} {path}"] = (response.status, data[:300].decode(errors="replace"))
        return data

    def _client() -> None:
        try:
            for _ in range(1200):  # until the model has loaded and the server listens
                try:
                    _ask("GET", "/api/health")
                    break
                except OSError:
                    time.sleep(0.1)
            _ask("GET", "/")
            hits = _ask("POST", "/api/search/text", json.dumps({"query": "a red thing", "k": 2}),
                        {"content-type": "application/json"})  # fmt: skip
            _ask("GET", f"/api/image/{json.loads(hits)['results'][0]['key']}")
            with open(os.environ["RECORDER_IMAGE"], "rb") as f:
                form = (b'--b\r\ncontent-disposition: form-data; name="file"; filename="q.jpg"\r\n'
                        b"content-type: image/jpeg\r\n\r\n" + f.read() + b"\r\n--b--\r\n")  # fmt: skip
            _ask("POST", "/api/search/image", form, {"content-type": "multipart/form-data; boundary=b"})
            _ask("POST", "/api/embed", "text=a+cat", {"content-type": "application/x-www-form-urlencoded"})
        except Exception as e:
            answers["client"] = (0, repr(e))
        finally:
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=_client, daemon=True).start()

from clipworks.cli import main  # noqa: E402

try:
    status = main(argv)
except KeyboardInterrupt:  # serve, stopped by its client
    status = "interrupted"
with open(out_path, "w") as f:
    json.dump({"status": status, "imports": sorted(imports), "loaded": sorted({m.split(".")[0] for m in sys.modules}),
               "answers": answers}, f)  # fmt: skip
