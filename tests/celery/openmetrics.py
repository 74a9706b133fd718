"""Parses OpenMetrics text from stdin with the reference parser (prometheus_client, strict: it
raises on anything the format forbids) and prints its samples as JSON lines:
{"name": ..., "labels": {...}, "value": ..., "type": ...}."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

text = sys.stdin.read()
for family in text_string_to_metric_families(text):
    for sample in family.samples:
        print(json.dumps({"name": sample.name, "labels": sample.labels,
                          "value": sample.value, "type": family.type}))
