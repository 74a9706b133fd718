"""The smallest plugin that speaks the protocol in Python: stdlib json, no SDK. The supervisor
bench compares the Python SDK with it (the SDK's share of the cost)."""

import json
import sys


def main():
    out = sys.stdout
    for line in sys.stdin:
        msg = json.loads(line)
        method, mid = msg.get("method"), msg.get("id")
        if method == "task.run":
            out.write('{"jsonrpc":"2.0","id":%s,"result":null}\n' % json.dumps(mid))
        elif method == "initialize":
            out.write(json.dumps({"jsonrpc": "2.0", "id": mid, "result": {
                "protocol_version": "1.0", "plugin": {"name": "minimal-python", "version": "1"},
                "tasks": [{"name": "minpy.noop"}]}}) + "\n")
        elif method == "ping":
            out.write('{"jsonrpc":"2.0","id":%s,"result":{}}\n' % json.dumps(mid))
        elif method == "shutdown":
            out.write('{"jsonrpc":"2.0","id":%s,"result":null}\n' % json.dumps(mid))
        elif method == "exit":
            return
        out.flush()


if __name__ == "__main__":
    main()
