"""docs/alerts.yml is valid rule YAML whose expressions use metrics Ponder exports, and
docs/operations.md documents exported metrics and shows the Flower screenshots it names."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = ("", "_total", "_bucket", "_sum", "_count")


def exported_metrics() -> set[str]:
    names = set()
    for source in ("ponder/api/prometheus.py", "ponder/workers/exporter.py"):
        names |= set(re.findall(r'"(ponder_[a-z_]+)"', (ROOT / source).read_text()))
    return {name + suffix for name in names for suffix in SUFFIXES}


def test_alert_rules():
    groups = yaml.safe_load((ROOT / "docs/alerts.yml").read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    names = {rule["alert"] for rule in rules}
    assert {"PonderNoInferenceWorker", "PonderQueueDepthGrowing", "PonderKVCacheFull", "PonderWebhookFailures"} <= names
    exported = exported_metrics()
    for rule in rules:
        assert rule["expr"] and rule["annotations"]["summary"] and rule["labels"]["severity"]
        used = set(re.findall(r"\bponder_[a-z_]+", rule["expr"]))
        assert used <= exported, f"{rule['alert']}: {used - exported} not exported"
    kv = next(rule for rule in rules if rule["alert"] == "PonderKVCacheFull")
    assert "0.95" in kv["expr"] and kv["for"] == "5m"


def test_operations_doc_images_exist_and_are_small():
    text = (ROOT / "docs/operations.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert images
    for image in images:
        path = ROOT / "docs" / image
        assert path.is_file() and 10_000 < path.stat().st_size < 1_000_000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    documented = set(re.findall(r"`(ponder_[a-z_]+)", text))
    assert documented and documented <= exported_metrics(), documented - exported_metrics()
