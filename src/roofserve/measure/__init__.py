"""In-process measurements with torch: timing, peaks, rooflines, model/pipeline/engine benches."""
