"""Fine-tuning that keeps what the backbone knew: FLYP, LP-FT, WiSE-FT and a soup, measured.

Runs the real commands in subprocesses, as a user would:

1. Pretrains a small CLIP (`model=clip_contrastive`, towers from a config, CLIP's own BPE
   tokenizer: `model.tokenizer=DIR`) on a mix of suite tasks (`benchmarks/suite.py`: their
   `pairs_train.csv` in one manifest) and exports it (`mmtrain export`): the pretrained
   backbone.
2. Fine-tunes it on a suite task the pretraining never saw, every run with
   `zeroshot.reference=[...]` naming the pretraining tasks' labelled validation sets:
   - `full FT`: the fusion classifier with the fine-tuning recipe, default keys;
   - `LP-FT`: the same with `optimizer.probe_steps` (a linear probe first);
   - `FLYP`: contrastive on captions made from the labels (`data.caption_from_label`),
     zero-shot classification with the same template; three seeds, the first is `FLYP`;
   - `WiSE-FT` at alpha 0.25/0.5/0.75 of each of those (`mmtrain wise`);
   - a uniform soup of FLYP's three seeds (`mmtrain soup`);
   - from scratch: the fusion classifier at the same budget, no backbone.
3. Scores every model the same way: target accuracy (classifying the target's validation
   images among its classes), zero-shot accuracy on each pretraining task (retention), and
   target accuracy on a shifted copy of the target (another seed, more pixel noise: out of
   distribution). A contrastive model classifies zero-shot with its template; a fusion
   classifier scores each (image, class caption) pair (`mmtrain predict`) and takes the class
   it most believes matches, and its towers (`mmtrain export`) are scored zero-shot on the
   pretraining tasks (`mmtrain eval out=...`) with the same template as FLYP.
4. Prints one markdown table and whether the issue's target is met: FLYP or LP-FT with WiSE-FT
   at 0.5 keeps >= 90% of the best fine-tuned target accuracy while recovering at least half
   of the zero-shot accuracy plain fine-tuning lost on the pretraining tasks.

    python benchmarks/transfer.py --work transfer_runs --out table.md
    python benchmarks/transfer.py --work transfer_runs --backbone-lr-scale 0.2 --methods fusion soup
    python benchmarks/transfer.py --tiny --methods --work /tmp/t   # a few steps, FLYP only

`--backbone-lr-scale X` sets optimizer.backbone_lr_scale=X in every fine-tuning run (from
scratch aside) and keeps its runs, averages and tables apart (`_lrX`): the recipe's default
against other rates. `--methods` picks what runs besides the pretraining and FLYP with its
WiSE-FT (which always run). The table goes to WORK/table[_lrX].md and results[_lrX].json.
Runs already finished in `--work` are reused. Figures: `benchmarks/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from suite import TASKS, write_task

PRETRAIN_TASKS = ("colours", "scenes", "relations")
TARGET = "counting"  # never seen in pretraining; shapes and objects are (relations)
TEMPLATE = "a photo of {}."  # FLYP's captions and every zero-shot prompt
ALPHAS = (0.25, 0.5, 0.75)
FULL = {  # sizes of the full benchmark (30 min on 2 shared, busy cores)
    "pretrain_pairs": (1500, 200),  # per pretraining task: train, val
    "target_pairs": (1000, 300),
    "pretrain_steps": 1200,
    "finetune_steps": 300,
    "probe_steps": 100,
}
TINY = {
    "pretrain_pairs": (24, 12),
    "target_pairs": (24, 12),
    "pretrain_steps": 3,
    "finetune_steps": 2,
    "probe_steps": 1,
}
SHIFT = {"seed": 1, "noise": 40.0}  # the out-of-distribution copy of the target
TOWERS = [  # small towers at 32 px in 8-px patches
    "model.backbone_config.projection_dim=64",
    "model.backbone_config.vision.image_size=32",
    "model.backbone_config.vision.patch_size=8",
    "model.backbone_config.vision.hidden_size=64",
    "model.backbone_config.vision.intermediate_size=256",
    "model.backbone_config.vision.num_hidden_layers=2",
    "model.backbone_config.text.hidden_size=64",
    "model.backbone_config.text.intermediate_size=256",
    "model.backbone_config.text.num_hidden_layers=2",
    "model.backbone_config.text.max_position_embeddings=32",
]
# A class drawn only in the validation split (at --tiny sizes) is skipped, and counted in the
# run's log and summary.json; at the full sizes every class is in every split.
SKIP = "data.on_bad_sample=skip"
BPE_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"


class Runner:
    """Runs `mmtrain` commands in subprocesses, logging each with its wall time."""

    def __init__(self, work: Path, threads: int):
        self.work = work
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        self.log = work / "commands.log"

    def __call__(self, *args: str) -> None:
        command = [sys.executable, "-m", "mmtrain", *args]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=self.env)
        wall = time.perf_counter() - started
        with open(self.log, "a") as handle:
            handle.write(f"{wall:7.1f} s  mmtrain {' '.join(args)}\n")
        if done.returncode != 0:
            print(done.stdout[-2000:] + done.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"failed ({done.returncode}): mmtrain {' '.join(args)}")
        print(f"{wall:6.1f} s  mmtrain {args[0]} {_short(args[1:])}", flush=True)


def _short(args: tuple[str, ...]) -> str:
    return " ".join(a for a in args if "=" in a and a.split("=")[0] in ("run", "out", "alpha"))


# --- data and tokenizer ---------------------------------------------------------------------


def bpe_vocab(work: Path, given: str | None) -> bytes:
    """CLIP's BPE merges (bpe_simple_vocab_16e6.txt.gz): from `given` (that file or an
    open_clip_torch wheel), the installed open_clip package, or the open_clip_torch wheel
    fetched without its dependencies by pip."""
    if given and not given.endswith(".whl"):
        return Path(given).read_bytes()
    wheel = Path(given) if given else None
    if wheel is None:
        import importlib.util

        found = importlib.util.find_spec("open_clip")
        if found and found.origin:
            return (Path(found.origin).parent / Path(BPE_FILE).name).read_bytes()
        wheels = work / "wheels"
        if not list(wheels.glob("open_clip_torch-*.whl")):
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
                 "open_clip_torch"], check=True,
            )  # fmt: skip
        wheel = sorted(wheels.glob("open_clip_torch-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(BPE_FILE)


def clip_tokenizer(work: Path, given: str | None) -> Path:
    """A transformers CLIPTokenizer folder of the real CLIP vocabulary (49,408 tokens), built
    from the BPE merges as open_clip's SimpleTokenizer reads them."""
    folder = work / "clip_tokenizer"
    if (folder / "tokenizer_config.json").is_file():
        return folder
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.decompress(bpe_vocab(work, given)).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77).save_pretrained(folder)
    return folder


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _absolute(folder: Path, rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{**row, "image": str(folder / row["image"])} for row in rows]


def write_data(work: Path, size: dict) -> dict[str, Path]:
    """The suite's tasks and the manifests the runs read: the pretraining mix (train, val),
    one labelled reference set per pretraining task, the target's matching and captioned
    sets, its shifted copy, and the (image, class caption) rows a fusion classifier is
    asked about (`nway.csv`)."""
    data, files = work / "data", {}
    mix = {"train": [], "val": []}
    (data / "reference").mkdir(parents=True, exist_ok=True)
    for task in PRETRAIN_TASKS:
        folder = write_task(task, data, *size["pretrain_pairs"])
        for split in mix:
            mix[split] += _absolute(folder, _rows(folder / f"pairs_{split}.csv"))
        val = _absolute(folder, _rows(folder / "pairs_val.csv"))
        files[f"ref:{task}"] = _write(data / "reference" / f"{task}.csv", val)
    for split, rows in mix.items():
        files[f"pretrain_{split}"] = _write(data / f"pretrain_{split}.csv", rows)
    target = write_task(TARGET, data, *size["target_pairs"])
    shifted = write_task(TARGET, data / "shifted", 2, size["target_pairs"][1], **SHIFT)
    for name in ("train", "val", "pairs_train", "pairs_val"):
        files[f"target_{name}"] = target / f"{name}.csv"
    ood = _absolute(shifted, _rows(shifted / "pairs_val.csv"))
    files["ref:shifted"] = _write(data / "reference" / f"{TARGET}_shifted.csv", ood)
    prompt = TASKS[TARGET].templates[0].replace("{name}", "{}")  # the matching captions' own
    asked = []
    for where, folder in (("target", target), ("shifted", shifted)):
        for row in _rows(folder / "pairs_val.csv"):
            for name in TASKS[TARGET].classes:
                image = str(folder / row["image"])
                asked.append({"image": image, "text": prompt.format(name), "set": where,
                              "truth": row["label"], "class": name})  # fmt: skip
    files["nway"] = _write(data / "nway.csv", asked)
    return files


# --- the runs -------------------------------------------------------------------------------

METHODS = ("flyp", "soup", "fusion", "recipe", "scratch")  # what --methods may name


def _list(paths: list[Path]) -> str:
    return "[" + ",".join(str(p) for p in paths) + "]"


class Bench:
    """The benchmark's runs and scores, under `work`."""

    def __init__(
        self, work: Path, size: dict, files: dict[str, Path], mmtrain: Runner, scale: float | None
    ):
        self.work, self.size, self.files, self.mmtrain = work, size, files, mmtrain
        # optimizer.backbone_lr_scale of every fine-tuning run (None: the recipe's auto);
        # its runs, averages and scores go to their own folders (suffix).
        self.scale = [] if scale is None else [f"optimizer.backbone_lr_scale={scale:g}"]
        self.suffix = "" if scale is None else f"_lr{scale:g}"
        self.refs = [files[f"ref:{task}"] for task in PRETRAIN_TASKS] + [files["ref:shifted"]]
        self.template = [f"data.caption_from_label='{TEMPLATE}'"]
        self.prompts = [f"zeroshot.templates=['{TEMPLATE}']"]
        steps = f"trainer.max_steps={size['finetune_steps']}"
        common = ["data=manifest", SKIP, steps]
        # A fusion classifier does not embed: its retention comes from its exported towers.
        self.fusion = [
            *common, f"data.train={files['target_train']}", f"data.val={files['target_val']}",
            "trainer.seed=0", *self.scale,
        ]  # fmt: skip
        self.flyp = [
            "model=clip_contrastive", *common, f"zeroshot.reference={_list(self.refs)}",
            f"data.train={files['target_pairs_train']}",
            f"data.val={files['target_pairs_val']}", *self.template,
            "trainer.checkpoint.monitor=val/zeroshot_top1", "trainer.checkpoint.mode=max",
            *self.scale,
        ]  # fmt: skip

    def train(self, name: str, *args: str) -> Path:
        """`mmtrain train ARGS` into runs/NAME (reused when finished)."""
        run = self.work / "runs" / (name if name in ("pretrain", "scratch") else name + self.suffix)
        if not (run / "summary.json").is_file():
            self.mmtrain("train", *args, f"hydra.run.dir={run}", "trainer.overwrite=true")
        return run

    def once(self, out: Path, *args: str) -> Path:
        """`mmtrain ARGS` whose result is `out` (skipped when `out` exists)."""
        if not out.exists():
            self.mmtrain(*args)
        return out

    def pretrain(self) -> Path:
        """The pretrained backbone: a contrastive CLIP trained on the mix, exported."""
        run = self.train(
            "pretrain", "model=clip_contrastive", f"model.tokenizer={self.files['tokenizer']}",
            *TOWERS, "data=manifest", SKIP, f"data.train={self.files['pretrain_train']}",
            f"data.val={self.files['pretrain_val']}", "data.batch_size=64", *self.prompts,
            f"trainer.max_steps={self.size['pretrain_steps']}", "trainer.seed=0",
        )  # fmt: skip
        backbone = self.work / "backbone"
        return self.once(backbone, "export", f"run={run}", f"out={backbone}")

    def wise(self, run: Path, alphas: tuple[float, ...]) -> Path:
        """`mmtrain wise` of `run` at `alphas`: the folder of alpha_A/ and wise.json."""
        out = self.work / "wise" / run.name
        listed = ",".join(f"{a:g}" for a in alphas)
        self.once(out / "wise.json", "wise", f"run={run}", f"alpha={listed}", f"out={out}")
        return out

    def zero_shot(self, backbone: Path, out: Path) -> dict[str, float]:
        """A never-trained contrastive model of `backbone`'s towers scored zero-shot
        (`mmtrain eval out=...`) on the target and every reference set."""
        self.once(
            out / "eval_val.json", "eval", f"out={out}", "model=clip_contrastive",
            f"model.backbone={backbone}", "data=manifest", SKIP,
            f"data.train={self.files['target_pairs_train']}",
            f"data.val={self.files['target_pairs_val']}", *self.template,
            f"zeroshot.reference={_list(self.refs)}",
        )  # fmt: skip
        return json.loads((out / "eval_val.json").read_text())["metrics"]

    def fusion_scores(self, run: Path, pretrained: bool = True) -> dict[str, float]:
        """A fusion classifier's row: each (image, class caption) pair scored by its head
        (`mmtrain predict`), the image given the class it most believes matches; and its
        towers (`mmtrain export`) zero-shot on the pretraining tasks (`mmtrain eval`)."""
        scored = self.work / "scores" / f"{run.parent.name}-{run.name}"
        out = scored / "nway.jsonl"
        self.once(out, "predict", f"run={run}", f"input={self.files['nway']}", f"output={out}")
        row = nway(out, self.files["nway"])
        if pretrained:
            towers = self.once(
                scored / "towers", "export", f"run={run}", f"out={scored / 'towers'}"
            )
            metrics = from_metrics(self.zero_shot(towers, scored / "zero_shot"))
            row |= {task: metrics[task] for task in PRETRAIN_TASKS}
        return row


# --- scores ---------------------------------------------------------------------------------


def from_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A contrastive model's row from its validation metrics (with zeroshot.reference)."""
    row = {"target": metrics["val/zeroshot_top1"]}
    row["shifted"] = metrics[f"val/reference/{TARGET}_shifted/zeroshot_top1"]
    for task in PRETRAIN_TASKS:
        row[task] = metrics[f"val/reference/{task}/zeroshot_top1"]
    return row


def nway(predictions: Path, asked: Path) -> dict[str, float]:
    """Accuracy of a matching classifier used as a classifier among the target's classes:
    each image goes to the class whose caption it most believes matches (label 1)."""
    best: dict[tuple[str, str], tuple[float, str, str]] = {}
    with open(predictions) as handle:
        predicted = [json.loads(line) for line in handle]
    for row, out in zip(_rows(asked), predicted, strict=True):
        key, belief = (row["set"], row["image"]), out["prob_1"]
        if key not in best or belief > best[key][0]:
            best[key] = (belief, row["class"], row["truth"])
    found = {}
    for where in ("target", "shifted"):
        hits = [c == t for (w, _), (_, c, t) in best.items() if w == where]
        found[where] = sum(hits) / len(hits)
    return found


BACKBONE_ROW = "pretrained backbone (zero-shot)"


def run_all(bench: Bench, methods: set[str]) -> dict[str, dict]:
    """Every run of the `methods` named, scored; the table's rows in order."""
    bench.pretrain()
    backbone = bench.work / "backbone"
    pretrained = f"model.backbone={backbone}"
    rows: dict[str, dict] = {}
    # FLYP's WiSE-FT at 0 and 1 is the backbone and FLYP itself, scored alike.
    flyp = bench.train("flyp_0", pretrained, *bench.flyp, "trainer.seed=0")
    wise = json.loads((bench.wise(flyp, (0, *ALPHAS, 1)) / "wise.json").read_text())
    by_alpha = {entry["alpha"]: from_metrics(entry["metrics"]) for entry in wise}
    rows[BACKBONE_ROW] = by_alpha[0]
    if "scratch" in methods:
        scratch = bench.train(
            "scratch",
            f"model.tokenizer={bench.files['tokenizer']}",
            *TOWERS,
            *(a for a in bench.fusion if a not in bench.scale),  # the recipe from scratch
        )
        rows["from scratch (fusion, same budget)"] = bench.fusion_scores(scratch, False)
    if "fusion" in methods:
        for method, name, extra in (
            ("full FT", "full_ft", []),
            ("LP-FT", "lp_ft", [f"optimizer.probe_steps={bench.size['probe_steps']}"]),
        ):
            run = bench.train(name, pretrained, *bench.fusion, *extra)
            rows[method] = bench.fusion_scores(run)
            averaged = bench.wise(run, ALPHAS)
            for alpha in ALPHAS:
                rows[f"{method} + WiSE {alpha:g}"] = bench.fusion_scores(
                    averaged / f"alpha_{alpha:g}"
                )
    if "recipe" in methods and not bench.scale:  # the recipe's towers' rate, 10x
        run = bench.train(
            "full_ft_scale0.2", pretrained, *bench.fusion, "optimizer.backbone_lr_scale=0.2"
        )
        rows["full FT, towers at lr x 0.2"] = bench.fusion_scores(run)
    rows["FLYP"] = by_alpha[1]
    for alpha in ALPHAS:
        rows[f"FLYP + WiSE {alpha:g}"] = by_alpha[alpha]
    if "soup" in methods:
        soup_dir = bench.work / f"soup{bench.suffix}"
        seeds = [flyp] + [
            bench.train(f"flyp_{seed}", pretrained, *bench.flyp, f"trainer.seed={seed}")
            for seed in (1, 2)
        ]
        for seed, run in enumerate(seeds[1:], 1):
            summary = json.loads((run / "summary.json").read_text())
            rows[f"FLYP (seed {seed})"] = from_metrics(summary["final"])
        soup = bench.once(soup_dir, "soup", *map(str, seeds), f"out={soup_dir}")
        rows["FLYP soup (3 seeds)"] = from_metrics(
            json.loads((soup / "averaged.json").read_text())["metrics"]
        )
    for row in rows.values():
        kept = [row[task] for task in PRETRAIN_TASKS if task in row]
        row["retention"] = statistics.mean(kept) if kept else float("nan")
    return rows


def table(rows: dict[str, dict]) -> str:
    columns = ["target", "shifted", *PRETRAIN_TASKS, "retention"]
    lines = [
        f"| method | {TARGET} acc | {TARGET} shifted (OOD) | "
        + " | ".join(f"{t} zero-shot" for t in PRETRAIN_TASKS)
        + " | retention (mean) |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for name, row in rows.items():
        cells = [f"{row[c]:.3f}" if c in row and row[c] == row[c] else "-" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check(rows: dict[str, dict]) -> tuple[bool | None, list[str]]:
    """The issue's target: FLYP or LP-FT with WiSE-FT at 0.5 keeps >= 90% of the best
    fine-tuned target accuracy and recovers >= half the zero-shot plain fine-tuning lost.
    None when the runs it compares were not all made (--methods)."""
    if "full FT" not in rows:
        return None, ["target not checked: it compares with full FT (--methods fusion)"]
    tuned = [n for n in rows if n in ("full FT", "LP-FT", "FLYP", "full FT, towers at lr x 0.2")]
    tuned += [n for n in rows if n.startswith("FLYP soup")]
    best = max(rows[name]["target"] for name in tuned)
    start, plain = rows[BACKBONE_ROW], rows["full FT"]
    lost = start["retention"] - plain["retention"]
    lines = [
        f"best fine-tuned target accuracy {best:.3f}; plain fine-tuning (full FT) moved the "
        f"pretraining tasks' mean zero-shot from {start['retention']:.3f} to "
        f"{plain['retention']:.3f} (lost {lost:.3f})"
    ]
    met = False
    for method in ("FLYP", "LP-FT"):
        row = rows[f"{method} + WiSE 0.5"]
        keeps = row["target"] >= 0.9 * best
        recovered = row["retention"] - plain["retention"]
        recovers = lost > 0 and recovered >= 0.5 * lost
        met = met or (keeps and recovers)
        lines.append(
            f"{method} + WiSE 0.5: target {row['target']:.3f} = {row['target'] / best:.0%} of the "
            f"best ({'>=' if keeps else '<'} 90%); retention {row['retention']:.3f}, "
            f"{recovered:+.3f} against full FT ({'>=' if recovers else '<'} half the loss)"
        )
    lines.append(f"target {'MET' if met else 'NOT MET'}")
    return met, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="transfer_runs", help="data, runs and scores")
    parser.add_argument("--tiny", action="store_true", help="a few steps and images: it runs")
    parser.add_argument(
        "--methods", nargs="*", default=list(METHODS), choices=METHODS,
        help="besides the pretraining and FLYP with its WiSE-FT, which always run (none: only those)",
    )  # fmt: skip
    parser.add_argument(
        "--backbone-lr-scale", type=float,
        help="optimizer.backbone_lr_scale of every fine-tuning run (default: the recipe's auto)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads per command")
    parser.add_argument("--bpe", help="bpe_simple_vocab_16e6.txt.gz or an open_clip_torch wheel")
    parser.add_argument("--out", help="append the table and the verdict to this file")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    size = TINY if args.tiny else FULL
    started = time.perf_counter()
    files = write_data(work, size)
    files["tokenizer"] = clip_tokenizer(work, args.bpe)
    bench = Bench(work, size, files, Runner(work, args.threads), args.backbone_lr_scale)
    rows = run_all(bench, set(args.methods))
    met, verdict = check(rows)
    report = table(rows) + "\n\n" + "\n".join(verdict) + "\n"
    print(report + f"\nwall {time.perf_counter() - started:.0f} s")
    results = {"rows": rows, "met": met, "backbone_lr_scale": args.backbone_lr_scale}
    (work / f"results{bench.suffix}.json").write_text(json.dumps(results, indent=1) + "\n")
    (work / f"table{bench.suffix}.md").write_text(report)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(report)


if __name__ == "__main__":
    main()
