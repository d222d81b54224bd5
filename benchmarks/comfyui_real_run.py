"""Run the node pack in a REAL ComfyUI over its HTTP API, once per offload strategy.

    python benchmarks/comfyui_real_run.py COMFYUI_DIR --python COMFY_VENV_PYTHON

The pack must already be installed the README way into that ComfyUI. This script writes
the demo checkpoints into ComfyUI's models/ folders and the demo start image into input/,
starts ``main.py --cpu`` on 127.0.0.1 (bounded in time, stopped at the end), queues a
LoadImage -> loaders -> TurboDiffusionI2VSampler -> TurboDiffusionSaveVideo + CreateVideo ->
SaveVideo + PreviewImage workflow per strategy, and prints one result line per strategy.

Conditioning: ComfyUI's CLIPLoader (type wan) always builds the full umT5-xxl (5.7B
parameters, from its fixed umt5_config_xxl.json), so a tiny test encoder cannot be loaded
by it. The harness therefore installs a test-only node, ``TurboWanTestConditioning``, in
its own custom_nodes folder (not part of the pack), which returns the demo prompt's text
states from turbowan's demo umT5 as ComfyUI CONDITIONING.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

STRATEGIES = ["adaptive", "layerwise", "chunkwise", "comfy_native", "cpu_only", "manual"]
OPTIONS = {"manual": '{"resident": [0]}'}
TEST_NODE = '''
import torch
from turbowan.pipeline.demo import DEMO_PROMPT, demo_files
from turbowan.pipeline.i2v import I2VPipeline
from turbowan.pipeline.settings import RunSettings
import folder_paths


class TurboWanTestConditioning:
    """Test harness only: the demo prompt encoded by turbowan's demo umT5."""
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def encode(self):
        files = demo_files(folder_paths.get_folder_paths("text_encoders")[0])
        pipe = I2VPipeline(RunSettings(high=files.high, low=files.low, vae=files.vae,
                                       text_encoder=files.text_encoder, tokenizer="demo",
                                       device="cpu", dtype=torch.float32))
        return ([[pipe.encode_prompt(DEMO_PROMPT), {}]],)


NODE_CLASS_MAPPINGS = {"TurboWanTestConditioning": TurboWanTestConditioning}
'''


def prepare(comfy: Path) -> None:
    from turbowan.pipeline.demo import demo_image, write_demo_checkpoints

    files = write_demo_checkpoints(comfy / "models" / "text_encoders")
    for folder, path in (("diffusion_models", files.high), ("diffusion_models", files.low),
                         ("vae", files.vae)):
        target = comfy / "models" / folder / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    demo_image().save(comfy / "input" / "turbowan_demo.png")
    node_dir = comfy / "custom_nodes" / "turbowan_test_conditioning"
    node_dir.mkdir(exist_ok=True)
    (node_dir / "__init__.py").write_text(TEST_NODE)


def workflow(strategy: str) -> dict:
    options = OPTIONS.get(strategy, "")
    loader = {"attention_type": "sla", "sla_topk": 0.5, "offload_strategy": strategy,
              "budget": "auto", "strategy_options": options}
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "turbowan_demo.png"}},
        "2": {"class_type": "TurboWanTestConditioning", "inputs": {}},
        "3": {"class_type": "TurboWanModelLoader",
              "inputs": {"model_name": "demo_dit_high.safetensors", **loader}},
        "4": {"class_type": "TurboWanModelLoader",
              "inputs": {"model_name": "demo_dit_low.safetensors", **loader}},
        "5": {"class_type": "TurboWanVAELoader",
              "inputs": {"vae_name": "demo_vae.safetensors", "offload_strategy": strategy,
                         "budget": "auto", "strategy_options": options}},
        "6": {"class_type": "TurboDiffusionI2VSampler",
              "inputs": {"high_noise_model": ["3", 0], "low_noise_model": ["4", 0],
                         "conditioning": ["2", 0], "vae": ["5", 0], "image": ["1", 0],
                         "num_frames": 9, "num_steps": 4, "resolution": "480p",
                         "aspect_ratio": "16:9", "boundary": 0.9, "sigma_max": 200.0,
                         "seed": 1, "use_ode": False, "width": 32, "height": 32,
                         "resize": "crop"}},
        "7": {"class_type": "TurboDiffusionSaveVideo",
              "inputs": {"frames": ["6", 0], "filename_prefix": f"turbowan_{strategy}",
                         "fps": 16, "format": "mp4"}},
        "8": {"class_type": "CreateVideo", "inputs": {"images": ["6", 0], "fps": 16.0}},
        "9": {"class_type": "SaveVideo",
              "inputs": {"video": ["8", 0], "filename_prefix": f"core_{strategy}",
                         "format": "auto", "codec": "auto"}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


def api(port: int, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        text = resp.read()
    return json.loads(text) if text.strip() else {}  # /interrupt answers with no body


def wait_for(port: int, prompt_id: str, deadline: float) -> dict:
    """The history entry of a prompt once it finished (success, error or interrupted)."""
    while time.monotonic() < deadline:
        entry = api(port, f"/history/{prompt_id}").get(prompt_id)
        if entry and entry["status"].get("status_str") in ("success", "error"):
            return entry
        time.sleep(0.5)
    raise RuntimeError("time limit reached")


def describe(entry: dict) -> str:
    status = entry["status"]
    made = sorted(o["filename"] for node in entry.get("outputs", {}).values()
                  for key in ("images", "video", "videos") for o in node.get(key, [])
                  if isinstance(o, dict) and "filename" in o)
    kinds = sorted({name.rsplit(".", 1)[-1] for name in made})
    events = [m[0] for m in status.get("messages", [])]
    error = next((m[1].get("exception_message", "") for m in status.get("messages", [])
                  if m[0] == "execution_error"), "")
    text = f"{status['status_str']}; {len(made)} outputs ({', '.join(kinds)})"
    if "execution_interrupted" in events:
        text += "; execution_interrupted"
    return text + (f"; error: {error.strip()}" if error else "")


def run(comfy: Path, python: str, port: int, limit_s: float) -> list[str]:
    server = subprocess.Popen([python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port",
                               str(port)], cwd=comfy, stdout=subprocess.DEVNULL,
                              stderr=open(comfy / "turbowan_real_run.log", "w"))
    deadline = time.monotonic() + limit_s
    lines = []
    try:
        while True:
            try:
                api(port, "/object_info/TurboDiffusionI2VSampler")
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("ComfyUI did not start; see turbowan_real_run.log") from None
                time.sleep(1)
        for strategy in STRATEGIES:
            entry = wait_for(port, api(port, "/prompt", {"prompt": workflow(strategy)})["prompt_id"],
                             deadline)
            lines.append(f"{strategy}: {describe(entry)}")
        # Cancel while sampling (a longer clip), then the same run again
        for strategy in ("adaptive", "comfy_native"):
            long_run = workflow(strategy)
            long_run["6"]["inputs"].update(num_frames=33, width=96, height=96)
            prompt_id = api(port, "/prompt", {"prompt": long_run})["prompt_id"]
            while not api(port, "/queue")["queue_running"]:
                time.sleep(0.1)
            time.sleep(1.5)
            api(port, "/interrupt", {})
            cancelled = wait_for(port, prompt_id, deadline)
            next_run = workflow(strategy)
            next_run["6"]["inputs"]["seed"] = 2  # not served from ComfyUI's output cache
            again = wait_for(port, api(port, "/prompt", {"prompt": next_run})["prompt_id"],
                             deadline)
            lines.append(f"{strategy} cancelled mid-run: {describe(cancelled)}; next run: "
                         f"{describe(again)}")
        return lines
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("comfyui_dir", type=Path)
    parser.add_argument("--python", default=sys.executable, help="ComfyUI's Python")
    parser.add_argument("--port", type=int, default=8199)
    parser.add_argument("--limit", type=float, default=900, help="seconds for the whole run")
    args = parser.parse_args()
    prepare(args.comfyui_dir)
    for line in run(args.comfyui_dir, args.python, args.port, args.limit):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
