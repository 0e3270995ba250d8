"""The papers' experiments: functions returning plain data (dicts of arrays)."""
