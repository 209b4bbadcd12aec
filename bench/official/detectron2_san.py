"""Run the OFFICIAL SAN (github MendelXu/SAN, a detectron2 project) as a timing server, inside the reference
environment made by `setup_reference_env.sh` (its venv; PYTHONPATH = this repository, detectron2, the official tree).

This file is a script, not a module of the package: it runs under the reference environment's Python (detectron2,
open_clip 2.16, the official source) and imports nothing of `bench` except the fill rule file, loaded by path.
`bench.official.OfficialTimer` starts it and talks to it over stdin / stdout, one line each way:

    -> (after the build)        ready <what was built>
    <- t                        -> <ms of one end-to-end call>
    <- q                        (exit)

One end-to-end call is what a user of the official code runs per image: the decoded uint8 image as the CHW tensor
detectron2's DatasetMapper makes, `model([{"image", "height", "width", "vocabulary"}])` (normalise, pad, CLIP, side
adapter, recognition head, the per-class maps at the input size) and the argmax of `sem_seg` (the label map our
end_to_end scope returns). The official classifier caches each word's text features, so the vocabulary is encoded
in the first (warm-up) call only, as ours is encoded before timing. Nothing of the official code is changed: the
only patch is open_clip's CLIP download (no network), which gets a locally built state dict in OpenAI's layout;
every parameter is then overwritten with our golden fill (`profile.weights=golden`), as ours is.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

import numpy as np
import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="official SAN timing server (see the module docstring)")
    p.add_argument("--config", required=True, help="official config file, relative to the official tree")
    p.add_argument("--source", required=True, help="the official source tree (the SAN repository at its commit)")
    p.add_argument("--image", required=True, help=".npy HxWx3 uint8")
    p.add_argument("--vocabulary", required=True, help="text file, one class name per line")
    p.add_argument("--precision", choices=["fp32", "autocast_bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--fill", required=True, help="path of bench/testing/fills.py (the golden fill rule)")
    p.add_argument("--fill-family", default="san")
    return p.parse_args(argv)


def _stub_clip_download(tmpdir: str) -> None:
    """open_clip's OpenAI download returns a local file holding a freshly built CLIP's state dict (OpenAI key
    layout); the values do not matter, every parameter is filled afterwards."""
    import open_clip
    import open_clip.openai
    from open_clip.factory import get_model_config

    def download(url, cache_dir=None, *args, **kwargs):
        name = os.path.basename(url)
        path = os.path.join(tmpdir, f"{name}.state_dict.pt")
        if not os.path.exists(path):
            arch = name[:-len(".pt")].replace("336px", "336")   # ViT-B-16.pt, ViT-L-14-336px.pt -> config name
            torch.save(open_clip.model.CLIP(**get_model_config(arch), quick_gelu=True).state_dict(), path)
        return path

    open_clip.openai.download_pretrained_from_url = download


def build(source: str, config: str):
    os.environ["WANDB_MODE"] = "disabled"
    if source not in sys.path:
        sys.path.insert(0, source)
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultTrainer
    from detectron2.projects.deeplab import add_deeplab_config
    from san import add_san_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_san_config(cfg)
    cfg.merge_from_file(os.path.join(source, config))
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return DefaultTrainer.build_model(cfg).eval()


def load_fill(path: str):
    spec = importlib.util.spec_from_file_location("ovseg_fills", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="official_clip_") as clip_dir:   # 0.6 GB; needed by the build only
        _stub_clip_download(clip_dir)
        model = build(args.source, args.config)
    what = load_fill(args.fill).fill_model(model, args.fill_family)
    image = np.load(args.image)
    names = [ln.strip() for ln in open(args.vocabulary, encoding="utf-8") if ln.strip()]
    h, w = image.shape[:2]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "autocast_bf16")

    def end_to_end() -> torch.Tensor:
        x = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        with autocast:
            out = model([{"image": x, "height": h, "width": w, "vocabulary": names}])
        return out[0]["sem_seg"].argmax(dim=0)

    print(f"ready {args.config}, {args.precision}, {torch.get_num_threads()} threads, {what}", flush=True)
    with torch.no_grad():
        for line in sys.stdin:
            if line.strip() != "t":
                break
            t0 = time.perf_counter()
            end_to_end()
            print(f"{(time.perf_counter() - t0) * 1e3:.3f}", flush=True)


if __name__ == "__main__":
    main()
