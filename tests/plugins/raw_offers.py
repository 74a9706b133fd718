"""A queue backend written without an SDK that ignores its window, for the tests: at
`initialized` it sends the offers in the JSON list `RAW_OFFERS` (each `task.offer` params) all
at once, and writes every response it reads as a JSON line to `RAW_ANSWERS`. Then it offers the
list again once every first answer is in, when `RAW_TWICE=1`."""
import json
import os
import sys

offers = json.loads(os.environ["RAW_OFFERS"])
answers = open(os.environ["RAW_ANSWERS"], "a")
twice = os.environ.get("RAW_TWICE") == "1"


def send(msg):
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def offer_all(first_id):
    for i, params in enumerate(offers):
        send({"jsonrpc": "2.0", "id": first_id + i, "method": "task.offer", "params": params})


answered = 0
for line in sys.stdin:
    msg = json.loads(line)
    method = msg.get("method")
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": msg["id"], "result": {
            "protocol_version": "1.5", "plugin": {"name": "raw", "version": "1.0.0"},
            "tasks": [], "capabilities": []}})
    elif method == "initialized":
        offer_all(1)
    elif method == "shutdown":
        send({"jsonrpc": "2.0", "id": msg["id"], "result": None})
    elif method == "exit":
        break
    elif method == "ping":
        send({"jsonrpc": "2.0", "id": msg["id"], "result": {}})
    elif "id" in msg and method is None:
        answers.write(json.dumps(msg) + "\n")
        answers.flush()
        answered += 1
        if twice and answered == len(offers):
            offer_all(1000)
