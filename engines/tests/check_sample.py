"""End-to-end checks of the C++ runtime against the Python CLI (run by ctest, see CMakeLists.txt).

``setup`` writes a tiny DyDiT checkpoint and compiles it with ``dyc compile`` into WORK/tiny.dyc
(fp32) and WORK/tiny16.dyc (fp16), two groups each, one of whose members differ, so its engine
takes per-t mask inputs; plus a noise file.
Each sampling case runs ``dyc run --noise ... --save-latents`` and ``dyc_sample`` with the same
noise and compares the final latents: max |diff| <= 1e-5 (latents of magnitude ~4; both run the same ONNX
Runtime, so what differs is float32 rounding in the samplers' arithmetic: measured 0 to 1.1e-6).
The bad-bundle cases damage a copy of the bundle and check that ``dyc_sample`` fails with a clear one-line message.
``shared_weights``
compiles an 8-group bundle over a ~350 MB weights file and checks that ``dyc_sample``'s peak
resident memory grows by at most 1.2x the weights file over a run on the tiny bundle (all group
sessions over one copy), and by more than 2x with ``--no-share-weights`` (ONNX Runtime's own
copies: the measurement tells them apart).
``shared_arena``
compiles an 8-group bundle with large activations (256 tokens) and checks that ``dyc_sample``'s peak
resident memory over a 20-step chain that visits several groups is below 0.7x that of
``--no-share-arena`` (one ONNX Runtime arena per group session), with equal latents.

    python check_sample.py CASE --repo REPO --work WORK --dyc-sample PATH/dyc_sample
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

TOL = 1e-5
CLASSES = "1,7"
SAMPLING = {  # case -> (bundle, dyc run options); dyc_sample takes the same options
    "ddim_cfg": ("tiny.dyc", ["--sampler", "ddim", "--steps", "10", "--cfg", "4"]),
    "dpm_cfg": ("tiny.dyc", ["--sampler", "dpm-solver++", "--steps", "8", "--cfg", "1.5"]),
    "ddim_nocfg": ("tiny.dyc", ["--sampler", "ddim", "--steps", "10", "--cfg", "1"]),
    "ddim_official_cfg": ("tiny.dyc", ["--sampler", "ddim", "--steps", "10", "--cfg", "4", "--cfg-official"]),
    "fp16_dpm_cfg": ("tiny16.dyc", ["--sampler", "dpm-solver++", "--steps", "8", "--cfg", "4"]),
}


def dyc_cli(args: argparse.Namespace, *cmd: str) -> subprocess.CompletedProcess:
    code = "import sys; from dyc.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *cmd], cwd=args.work, capture_output=True, text=True)


def must(p: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if p.returncode != 0:
        sys.exit(f"{what} failed (exit {p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def setup(args: argparse.Namespace) -> None:
    work = args.work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    # a tame tiny DyDiT (tests/runtime_fixtures.py): eps ~ x, so sampling chains stay bounded and
    # two correct implementations differ by float rounding only, not by rounding x 158
    from dyc.checkpoint import save_checkpoint

    sys.path.insert(0, str(args.repo / "tests"))
    try:
        from runtime_fixtures import tame_config, tame_model

        cfg = tame_config()
        model = tame_model(cfg, seed=3)
    except ImportError:  # without the test helpers: a small random DyDiT, chains kept short
        import torch

        from dyc.config import ModelConfig
        from dyc.model import DyDiT

        torch.manual_seed(3)
        cfg = ModelConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                          num_classes=10)
        model = DyDiT(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name != "pos_embed":
                    p.normal_(0.0, 3.0 if "_rate.router" in name else 0.05)
    save_checkpoint(model, work / "tiny.safetensors")
    for name, dtype in (("tiny.dyc", "fp32"), ("tiny16.dyc", "fp16")):
        must(dyc_cli(args, "compile", "tiny.safetensors", "-o", name, "--groups", "2", "--sampler", "ddim",
                     "--steps", "10", "--calib", "1", "--calib-steps", "2", "--dtype", dtype), "dyc compile")
    m = json.loads((work / "tiny.dyc" / "manifest.json").read_text())
    takes = [g["index"] for g in m["groups"] if any(v is not None for v in (g.get("inputs") or {}).values())]
    print(f"compiled {len(m['groups'])} group(s); groups taking mask inputs: {takes}")
    noise = np.random.default_rng(0).standard_normal((2, cfg.in_channels, cfg.input_size, cfg.input_size))
    np.save(work / "noise.npy", noise.astype(np.float32))


def sample_case(args: argparse.Namespace, case: str) -> None:
    work, (bundle, opts) = args.work, SAMPLING[case]
    ref, got = work / f"{case}.ref.npy", work / f"{case}.cpp.npy"
    must(dyc_cli(args, "run", bundle, *opts, "--classes", CLASSES, "--noise", "noise.npy", "--save-latents",
                 ref.name, "-o", f"{case}.out"), "dyc run")
    p = subprocess.run([str(args.dyc_sample), str(work / bundle), *opts, "--classes", CLASSES, "--noise",
                        str(work / "noise.npy"), "--out", str(got)], capture_output=True, text=True)
    must(p, "dyc_sample")
    a, b = np.load(ref), np.load(got)
    if a.shape != b.shape:
        sys.exit(f"shape mismatch: dyc run {a.shape}, dyc_sample {b.shape}")
    err = float(np.abs(a - b).max())
    print(f"{case}: max |dyc run - dyc_sample| = {err:.3g} (latents up to {float(np.abs(a).max()):.3g})")
    if not np.isfinite(err) or err > TOL:
        sys.exit(f"{case}: latents differ by {err:.3g} > {TOL}")


def _peak_rss(cmd: list[str], timing: Path) -> int:
    """Peak resident bytes of one dyc_sample run, as it reports them (VmHWM: rusage's maxrss would
    carry over the RSS of this Python process across fork + exec)."""
    must(subprocess.run([*cmd, "--timing", str(timing)], capture_output=True, text=True), "dyc_sample")
    peak = json.loads(timing.read_text())["peak_rss_bytes"]
    if peak < 0:
        sys.exit("dyc_sample cannot read its peak RSS on this system")
    return peak


def random_router_bundle(args: argparse.Namespace, name: str, **cfg_kw) -> Path:
    """WORK/NAME.dyc: a random DyDiT whose routers vary with t, compiled into 8 groups (once)."""
    import torch

    from dyc.checkpoint import save_checkpoint
    from dyc.config import ModelConfig
    from dyc.model import DyDiT

    bundle = args.work / f"{name}.dyc"
    if not bundle.exists():
        torch.manual_seed(0)
        model = DyDiT(ModelConfig(patch_size=2, in_channels=4, num_classes=10, **cfg_kw)).eval()
        with torch.no_grad():  # random routers: architectures vary with t, 8 groups
            for pname, p in model.named_parameters():
                if pname != "pos_embed":
                    p.normal_(0.0, 3.0 if "_rate.router" in pname else 0.05)
        save_checkpoint(model, args.work / f"{name}.safetensors")
        must(dyc_cli(args, "compile", f"{name}.safetensors", "-o", bundle.name, "--groups", "8", "--calib", "1",
                     "--calib-steps", "2"), "dyc compile")
    return bundle


def shared_arena_case(args: argparse.Namespace) -> None:
    work = args.work
    bundle = random_router_bundle(args, "act", input_size=32, hidden_size=128, depth=4, num_heads=4)
    if not (work / "noise_act.npy").exists():
        np.save(work / "noise_act.npy", np.random.default_rng(0).standard_normal((8, 4, 32, 32)).astype(np.float32))

    def run(out: str, *extra: str) -> int:
        return _peak_rss([str(args.dyc_sample), str(bundle), "--classes", "0,1,2,3,4,5,6,7", "--noise",
                          str(work / "noise_act.npy"), "--steps", "20", "--cfg", "4", "--out", str(work / out),
                          "--quiet", *extra], work / "arena.json")

    shared, own = run("arena_shared.npy"), run("arena_own.npy", "--no-share-arena")
    print(f"peak RSS over a 20-step chain (16 rows x 256 tokens, 8 groups): one shared arena {shared / 1e6:.0f} MB, "
          f"an arena per session {own / 1e6:.0f} MB ({shared / own:.2f}x)")
    if not np.array_equal(np.load(work / "arena_shared.npy"), np.load(work / "arena_own.npy")):
        sys.exit("the shared arena changed the latents")
    if shared > 0.7 * own:
        sys.exit(f"shared arena: peak RSS {shared / own:.2f}x that of one arena per session (> 0.7x)")


def shared_weights_case(args: argparse.Namespace) -> None:
    work = args.work
    big = random_router_bundle(args, "big", input_size=8, hidden_size=512, depth=8, num_heads=8)
    weights = (big / "weights.bin").stat().st_size
    groups = len(json.loads((big / "manifest.json").read_text())["groups"])

    def run(bundle: Path, *extra: str) -> int:
        return _peak_rss([str(args.dyc_sample), str(bundle), "--classes", CLASSES, "--noise", str(work / "noise.npy"),
                          "--steps", "2", "--cfg", "1", "--out", str(work / "rss.npy"), "--quiet", *extra],
                         work / "rss.json")

    base = run(work / "tiny.dyc")
    shared = run(big) - base
    owned = run(big, "--no-share-weights") - base
    print(f"{groups} groups, weights.bin {weights / 1e6:.0f} MB: peak RSS over the tiny bundle's "
          f"{shared / 1e6:.0f} MB shared ({shared / weights:.2f}x), "
          f"{owned / 1e6:.0f} MB owned ({owned / weights:.2f}x)")
    if groups < 4 or weights < 300e6:
        sys.exit("the test bundle is too small to tell copies apart")
    if shared > 1.2 * weights:
        sys.exit(f"shared weights: peak RSS grew {shared / weights:.2f}x the weights file (> 1.2x)")
    if owned < 2.0 * weights:
        sys.exit(f"owned weights grew only {owned / weights:.2f}x: the measurement cannot tell copies apart")


def broken_copy(args: argparse.Namespace, name: str) -> Path:
    dst = args.work / f"{name}.dyc"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(args.work / "tiny.dyc", dst)
    return dst


def expect_failure(args: argparse.Namespace, bundle: Path, needles: list[str], extra: list[str] | None = None,
                   code: int = 1) -> None:
    cmd = [str(args.dyc_sample), str(bundle), "--classes", CLASSES, "--noise", str(args.work / "noise.npy"),
           "--out", str(args.work / "never.npy"), "--steps", "2", *(extra or [])]
    p = subprocess.run(cmd, capture_output=True, text=True)
    err = p.stderr.strip()
    print(f"exit {p.returncode}: {err}")
    if p.returncode != code:
        sys.exit(f"expected exit {code}, got {p.returncode}")
    for n in needles:
        if n not in err:
            sys.exit(f"error message lacks {n!r}")
    if "Traceback" in err or "terminate called" in err:
        sys.exit("not a clean error")


def bad_case(args: argparse.Namespace, case: str) -> None:
    if case == "bad_checksum":
        b = broken_copy(args, case)
        w = b / "weights.bin"
        data = bytearray(w.read_bytes())
        data[len(data) // 2] ^= 0x01  # same size, one bit flipped: only the sha256 can tell
        w.write_bytes(bytes(data))
        expect_failure(args, b, ["weights.bin", "sha256 mismatch"])
    elif case == "missing_file":
        b = broken_copy(args, case)
        (b / "group0.onnx").unlink()
        expect_failure(args, b, ["group0.onnx", "is missing"])
    elif case == "edited_manifest":
        b = broken_copy(args, case)
        m = json.loads((b / "manifest.json").read_text())
        m["groups"][0]["t_hi"] += 1  # a hand edit (the checksum is left as it was)
        (b / "manifest.json").write_text(json.dumps(m, indent=1))
        expect_failure(args, b, ["manifest.json", "modified after compile"])
        (b / "manifest.json").unlink()
        expect_failure(args, b, ["not a dyc bundle"])
    elif case == "other_family":
        # a U-ViT bundle (here: the family field set, checksum recomputed as compile writes it) is refused
        # with a message naming what runs it, not a parse error
        from dyc.bundle import manifest_checksum

        b = broken_copy(args, case)
        m = json.loads((b / "manifest.json").read_text())
        m["model"]["config"]["family"] = "uvit"
        m["manifest_sha256"] = manifest_checksum(m)
        (b / "manifest.json").write_text(json.dumps(m, indent=1))
        expect_failure(args, b, ["'uvit' bundle", "DiT-family bundles only", "dyc run"])
    elif case == "bad_args":
        tiny = args.work / "tiny.dyc"
        expect_failure(args, tiny, ["unknown sampler 'euler'"], ["--sampler", "euler"], code=2)
        expect_failure(args, tiny, ["3 class ids for a batch of 2"], ["--classes", "1,2,3"])
        expect_failure(args, tiny, ["class id 10 is out of range"], ["--classes", "1,10"])
        expect_failure(args, args.work / "nonexistent.dyc", ["no such bundle directory"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("case")
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--dyc-sample", type=Path, required=True)
    args = ap.parse_args()
    if args.case == "setup":
        setup(args)
    elif args.case in SAMPLING:
        sample_case(args, args.case)
    elif args.case == "shared_weights":
        shared_weights_case(args)
    elif args.case == "shared_arena":
        shared_arena_case(args)
    else:
        bad_case(args, args.case)
    print("ok")


if __name__ == "__main__":
    main()
