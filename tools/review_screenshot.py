"""The README's picture of a review: a real TensorBoard server over a real sweep, shot with headless Chromium.

    python tools/review_screenshot.py                 # sweeps four methods on the sample images, writes docs/review-*.png
    python tools/review_screenshot.py --sweep DIR     # an existing sweep directory instead

Needs Debian's ``chromium`` package (``apt-get install chromium``); nothing else leaves the machine:
TensorBoard listens on a loopback port and is stopped by its PID.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = "saliency,integrated_gradients,occlusion,gradcam"
VIEWS = {  # file -> TensorBoard page: one input's card (every method a row), and the HParams table of the sweep
    "review-images.png": "#images",
    "review-hparams.png": "#hparams",
}


def sweep(directory: Path) -> Path:
    vizkit = Path(sys.executable).parent / "vizkit"
    subprocess.run([str(vizkit), "-m", f"method={METHODS}", "data=shapes", "data.count=4", "metrics=[deletion,pointing_game]",
                    f"hydra.sweep.dir={directory}", "trainer.progress_bar=false"], check=True, cwd=directory.parent)
    return directory


def serve(logdir: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port),
                               "--load_fast", "false"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as response:
                if len(response.read()) > 2:
                    return server, port
        except OSError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("TensorBoard did not start in 60 s")


def shoot(url: str, path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Chromium: apt-get install chromium")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,900",
                    "--virtual-time-budget=15000", f"--screenshot={path}", url], check=True, capture_output=True, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, help="a sweep directory (default: run one)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        logdir = args.sweep or sweep(Path(scratch) / "sweep")
        server, port = serve(logdir)
        try:
            args.out.mkdir(exist_ok=True)
            for name, view in VIEWS.items():
                shoot(f"http://127.0.0.1:{port}/{view}", args.out / name)
                print(f"wrote {args.out / name}")  # user-facing
        finally:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
