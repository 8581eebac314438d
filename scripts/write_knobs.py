"""Write docs/knobs.md, the knob reference, from the config dataclasses: `python scripts/write_knobs.py`."""

from pathlib import Path

from roofserve.config import knob_reference

if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "docs" / "knobs.md"
    path.write_text(knob_reference())
    print(f"wrote {path}")
