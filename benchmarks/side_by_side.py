"""Whole runs of two source trees, alternated run by run, same machine, same time:

    git archive d8da390 | tar -x -C /tmp/before      # the layout before vizkit/run (entry: vizkit.app)
    python benchmarks/side_by_side.py /tmp/before vizkit.app /tmp/after vizkit.cli.app [ROUNDS] [--out FILE]

Each run is a fresh subprocess of this interpreter with PYTHONPATH set to its tree, OMP_NUM_THREADS=1.
seconds = run_seconds - model_load_seconds (what the runner rows measure); floor = method/fit/scan seconds.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

args = [arg for arg in sys.argv[1:] if not arg.startswith("--out")]
out_file = next((arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith("--out=")), None)
work = Path(tempfile.mkdtemp(prefix="side-by-side-"))
images = work / "images"; images.mkdir(exist_ok=True)
rng = np.random.default_rng(0)
for i in range(8):
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(images / f"img{i}.png")
TREES = {"before": (args[0], args[1]), "after": (args[2], args[3])}
RUNS = {
    "saliency": ["model=resnet18", "data=images", f"data.paths=[{images}]", "method=saliency"],
    "gradcam": ["model=resnet18", "data=images", f"data.paths=[{images}]", "method=gradcam"],
    "occlusion": ["model=resnet18", "data=images", f"data.paths=[{images}]", "method=occlusion", "method.window=56", "method.stride=28"],
    "fgsm": ["model=resnet18", "data=images", f"data.paths=[{images}]", "method=fgsm"],
    "class_model": ["method=class_model", "method.steps=32"],
    "top_patches": ["method=top_patches", "data=shapes", "data.count=64", "data.batch_size=16"],
}
ROUNDS = int(args[4]) if len(args) > 4 else 4
python = sys.executable
out = {name: {tree: [] for tree in TREES} for name in RUNS}
for round_ in range(ROUNDS):
    for name, overrides in RUNS.items():
        order = list(TREES) if round_ % 2 == 0 else list(TREES)[::-1]
        for tree in order:
            root, module = TREES[tree]
            run_dir = work / f"{name}-{tree}-{round_}"
            env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": root}
            done = subprocess.run([python, "-m", module, *overrides, "data.batch_size=8" if "data=shapes" not in overrides else "seed=0",
                                   "trainer.accelerator=cpu", "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"],
                                  cwd=work, env=env, capture_output=True, text=True)
            if done.returncode:
                print(name, tree, done.stderr[-2000:]); sys.exit(1)
            t = json.loads((run_dir / "results.json").read_text())["timings"]
            floor = t.get("method_seconds", t.get("fit_seconds", t.get("scan_seconds")))
            out[name][tree].append({"seconds": t["run_seconds"] - t["model_load_seconds"], "floor": floor})
rows = []
for name in RUNS:
    row = {"run": name}
    for tree in TREES:
        s = statistics.median(r["seconds"] for r in out[name][tree]); f = statistics.median(r["floor"] for r in out[name][tree])
        row[tree] = {"seconds": round(s, 4), "floor": round(f, 4), "overhead": round(s - f, 4), "all": [round(r["seconds"], 3) for r in out[name][tree]]}
    row["after/before"] = round(row["after"]["seconds"] / row["before"]["seconds"], 4)
    rows.append(row); print(json.dumps(row))
if out_file:
    Path(out_file).write_text(json.dumps(rows, indent=1))
