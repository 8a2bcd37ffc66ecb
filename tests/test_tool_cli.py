"""One CLI style (issue 18, item 5): the tools' command lines come from typed, documented signatures through
`cft_lightning/_tool_cli.py` (jsonargparse). Every tool takes `--config FILE` and `--print_config`; what
`--print_config` prints, passed back with `--config`, gives the command the same arguments; a flag overrides the
file; flags keep their argparse habits (a bare boolean flag, space-separated lists, shared options flattened)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from cft_lightning import demo, explain, sweep
from cft_lightning._tool_cli import Tool
from cft_lightning.benchmarks.shortcut_parts import ShortcutPartsSpec
from cft_lightning.cli import main
from cft_lightning.concepts import discovery, validate
from cft_lightning.critique import cli as critique_cli
from cft_lightning.demo.settings import ALL_METHODS, PROBE_METHODS, DemoSettings
from cft_lightning.masks import cli as masks_cli
from cft_lightning.masks.grounding_options import GroundingOptions

SWEEP_FILE = str(Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "smoke_lr.yaml")

# every converted command with non-default values for its options (a bare boolean flag and flattened
# Grounded-SAM flags among them)
COMMANDS: dict[str, list[str]] = {
    "concepts": ["--classes", "classes.txt", "--out", "bank.json", "--model", "llama-3", "--samples", "3",
                 "--base_url", "http://127.0.0.1:9/v1", "--min_success", "0.5", "--no_progress"],
    "concepts validate": ["--bank", "bank.json", "--images", "imgs", "--out", "v.json", "--grounder", "oracle",
                          "--masks", "store", "--box_threshold", "0.4", "--per_class", "5", "--seed", "3"],
    "masks import": ["--format", "binary", "--src", "pngs", "--out", "store", "--kind", "critic", "--overwrite"],
    "masks generate": ["--images", "imgs", "--concepts", "bank.json", "--out", "store", "--grounder", "oracle",
                       "--oracle_masks", "truth", "--segmenter", "my/sam", "--devices", "2", "--no_progress"],
    "explain": ["--ckpt", "run.ckpt", "--images", "a.png", "imgs", "--method", "gradcam", "--layer", "layer3",
                "--target", "2", "--classes", "imagenet", "--batch_size", "4", "--no_progress"],
    "critique": ["--model", "resnet18", "--pretrained", "--data", "imgs", "--out", "store", "--critic", "oracle",
                 "--oracle_masks", "truth", "--target", "prediction", "--attribution", "ixg", "--min_success", "0.5",
                 "--devices", "2", "--no_structured"],
    # the documented runs' flags (docs/demo.md, docs/results.md): lists, groups, a bare flag, the benchmark's
    "demo": ["--seeds", "0", "1", "2", "3", "4", "--methods", "all", "probes", "--out", "runs/demo5", "--decoy_only",
             "--critic", "pipeline", "--class_fraction", "0.5", "--start", "scratch", "--overlays", "0",
             "--threads", "2", "--num_classes", "3", "--image_size", "48", "--report"],
}
TOOLS = {"concepts": discovery.TOOL, "concepts validate": validate.TOOL, "explain": explain.TOOL,
         "critique": critique_cli.TOOL, "demo": demo.TOOL}


def parse(command: str, argv: list[str]) -> dict[str, Any]:
    """The keyword arguments the command's function would be called with."""
    if command in TOOLS:
        return TOOLS[command].parse(argv)
    name, kwargs = masks_cli.TOOL.parse([command.split()[1], *argv])
    assert name == command.split()[1]
    return kwargs


def print_config(command: str, argv: list[str], capsys: pytest.CaptureFixture, tmp_path: Path) -> Path:
    """`cft COMMAND --print_config ARGV` through the `cft` entry point, saved as a file."""
    with pytest.raises(SystemExit) as exc:
        main([*command.split(), "--print_config", *argv])
    out = capsys.readouterr().out
    assert exc.value.code in (0, None), out
    path = tmp_path / "printed.yaml"
    path.write_text(out, encoding="utf-8")
    return path


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_print_config_read_back_with_config_gives_the_same_arguments(command: str, capsys: pytest.CaptureFixture,
                                                                     tmp_path: Path):
    argv = COMMANDS[command]
    path = print_config(command, argv, capsys, tmp_path)
    printed = yaml.safe_load(path.read_text())
    assert "config" not in printed and set(printed) >= {a[2:] for a in argv if a.startswith("--")}
    given = parse(command, argv)
    assert parse(command, ["--config", str(path)]) == given


def test_a_config_file_sets_values_and_a_flag_after_it_overrides_them(tmp_path: Path):
    config = tmp_path / "concepts.yaml"
    config.write_text("classes: imagenet\nout: bank.json\nmodel: from-file\nsamples: 5\nno_progress: true\n")
    got = discovery.TOOL.parse(["--config", str(config), "--model", "from-flag"])
    assert (got["model"], got["samples"], got["no_progress"], got["classes"]) == ("from-flag", 5, True, "imagenet")
    # a flattened option (--box_threshold) from a file and from a flag
    config.write_text("images: imgs\nconcepts: bank.json\nout: store\nbox_threshold: 0.5\ntext_threshold: 0.3\n")
    _, got = masks_cli.TOOL.parse(["generate", "--config", str(config), "--box_threshold", "0.6"])
    assert got["grounding"] == GroundingOptions(box_threshold=0.6, text_threshold=0.3)
    assert got["devices"] == "auto" and got["num_nodes"] == 1


@pytest.mark.parametrize(("flag", "value"), [(["--no_progress"], True), (["--no_progress", "false"], False),
                                             (["--no_progress=true"], True), ([], False)])
def test_a_boolean_flag_alone_means_true_and_takes_an_explicit_value(flag: list[str], value: bool):
    assert discovery.TOOL.parse(["--classes", "c", "--out", "o", *flag])["no_progress"] is value


def test_bad_values_are_refused_by_type_before_anything_runs(capsys: pytest.CaptureFixture):
    for argv in (["masks", "import", "--format", "png", "--src", "s", "--out", "o"],
                 ["concepts", "--classes", "c", "--out", "o", "--samples", "two"],
                 ["concepts", "--classes", "c", "--out", "o", "--no_such_flag", "1"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and "error:" in capsys.readouterr().err, argv


def test_sweep_passes_other_options_to_every_run_and_its_printed_config_runs_the_same(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path):
    calls: list[tuple] = []

    def record(path: str, out: str | None, dry_run: bool, max_runs: int | None, extra: list[str] | None) -> dict:
        calls.append((path, out, dry_run, max_runs, extra))
        return {"runs": []}

    monkeypatch.setattr(sweep, "run_sweep", record)
    argv = ["sweep", "--dry_run", SWEEP_FILE, "--out", "runs/x", "--trainer.max_epochs=2", "--max_runs", "1",
            "--", "--seed_everything=3"]
    main(argv)
    want = (SWEEP_FILE, "runs/x", True, 1, ["--trainer.max_epochs=2", "--seed_everything=3"])
    assert calls == [want]
    path = print_config("sweep", argv[1:], capsys, tmp_path)
    assert yaml.safe_load(path.read_text())["run_args"] == want[-1]
    main(["sweep", "--config", str(path)])
    assert calls[-1] == want
    main(["sweep", "--config", str(path), "--dry_run", "false", "--trainer.devices=2"])  # flags after the file
    assert calls[-1] == (*want[:2], False, 1, [*want[-1], "--trainer.devices=2"])
    with pytest.raises(SystemExit) as exc:
        main(["sweep", SWEEP_FILE, "--trainer.devices", "4"])
    assert exc.value.code == 2 and "--key=value" in capsys.readouterr().err


# ------------------------------------------------------------------ cft explain, cft critique, cft demo
def test_explain_and_critique_take_flags_from_a_file_and_a_later_flag_overrides_it(tmp_path: Path):
    config = tmp_path / "explain.yaml"
    config.write_text("model: vit_tiny_patch16_224\npretrained: true\nimages: [a.png, imgs]\nmethod: gradcam\n"
                      "batch_size: 4\n")
    got = explain.TOOL.parse(["--config", str(config), "--method", "ixg", "--images", "b.png"])
    assert (got["model"], got["pretrained"], got["method"], got["images"], got["batch_size"]) == (
        "vit_tiny_patch16_224", True, "ixg", ["b.png"], 4)
    config.write_text("ckpt: run.ckpt\ndata: imgs\nout: store\ncritic: oracle\nsamples: 8\ndevices: auto\n")
    got = critique_cli.TOOL.parse(["--config", str(config), "--samples", "16", "--devices", "4"])
    assert (got["ckpt"], got["critic"], got["samples"], got["devices"]) == ("run.ckpt", "oracle", 16, 4)
    assert critique_cli.TOOL.parse(["--config", str(config)])["devices"] == "auto"


@pytest.mark.parametrize("command", ["explain", "critique"])
def test_explain_and_critique_want_exactly_one_of_ckpt_and_model(command: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture):
    """The either/or that argparse's mutually exclusive group said: one `cft: error:` line, exit 2."""
    required = ["--images", str(tmp_path)] if command == "explain" else ["--data", str(tmp_path), "--out", "o"]
    for extra, message in (([], "one of --ckpt"), (["--ckpt", "a.ckpt", "--model", "m"], "exclude each other")):
        with pytest.raises(SystemExit) as exc:
            main([command, *required, *extra])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and err.count("\n") == 1, err


def test_demo_print_config_then_config_runs_the_same_settings(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture, tmp_path: Path):
    """`cft demo ... --print_config > demo.yaml`, then `cft demo --config demo.yaml`: the demo runs with the same
    `DemoSettings` (recorded at `--calibrate`, which trains nothing here); a flag after the file overrides it."""
    ran: list[DemoSettings] = []
    monkeypatch.setattr(demo, "_calibrate", ran.append)
    out = str(tmp_path / "run")
    argv = ["--seeds", "0", "1", "2", "3", "4", "--methods", "all", "probes", "--out", out, "--decoy_only",
            "--critic", "pipeline", "--class_fraction", "0.5", "--start", "scratch", "--num_classes", "3",
            "--threads", "2", "--calibrate"]
    main(["demo", *argv])
    want = DemoSettings(out=out, seeds=[0, 1, 2, 3, 4], methods=list(dict.fromkeys(ALL_METHODS + PROBE_METHODS)),
                        benchmark=ShortcutPartsSpec(num_classes=3, decoy=True, background_shortcut=False,
                                                    decoy_side=64 // 6),
                        critic="pipeline", class_fraction=0.5, start="scratch", threads=2, progress=False)
    assert ran == [want]
    path = print_config("demo", argv, capsys, tmp_path)
    printed = yaml.safe_load(path.read_text())
    assert printed["seeds"] == [0, 1, 2, 3, 4] and printed["methods"] == ["all", "probes"]
    assert printed["num_classes"] == 3 and printed["decoy_only"] is True and "settings" not in printed
    main(["demo", "--config", str(path)])
    assert ran[-1] == want
    main(["demo", "--config", str(path), "--seeds", "7", "--methods", "cft", "--decoy_only", "false"])
    assert (ran[-1].seeds, ran[-1].methods, ran[-1].benchmark) == ([7], ["cft"], ShortcutPartsSpec(num_classes=3))
    main(["demo", "--out", out, "--calibrate"])  # no flags: the defaults of DemoSettings
    assert ran[-1] == DemoSettings(out=out, progress=False)


def test_demo_keeps_its_flags_and_refuses_bad_values_in_one_line(capsys: pytest.CaptureFixture):
    """The flags of the argparse `cft demo`, no more (the ViT's size and the benchmark's seed stay fixed), and a
    benchmark value out of range is the benchmark's one-line error."""
    flags = {a.option_strings[-1] for a in demo.TOOL.parser()._actions if a.option_strings}
    assert flags == {"--help", "--config", "--print_config", "--out", "--seeds", "--methods", "--spurious_rate",
                     "--decoy", "--decoy_only", "--decoy_side", "--critic", "--num_classes", "--image_size",
                     "--train_per_class", "--test_per_class", "--start", "--pretrain_epochs", "--scratch_epochs",
                     "--pretrain_lr", "--shortcut_epochs", "--shortcut_lr", "--finetune_epochs", "--finetune_lr",
                     "--images_per_class", "--class_fraction", "--full_split_epochs", "--fewshot_pool",
                     "--mask_source", "--data_dir", "--overlays", "--threads", "--report", "--calibrate",
                     "--no_progress"}
    for argv, message in ((["--num_classes", "11"], "num_classes must be in [2, 10]"),
                          (["--start", "warm"], "--start")):
        with pytest.raises(SystemExit) as exc:
            main(["demo", *argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err, err


# ------------------------------------------------------------------ the module
@dataclasses.dataclass(frozen=True)
class Data:
    """Generated data.

    Args:
        num_classes: classes to draw
        decoy: also draw a decoy
    """

    num_classes: int = 6
    decoy: bool = False


@dataclasses.dataclass
class Settings:
    """A demo-like settings dataclass as a tool.

    Args:
        out: output folder
        seeds: seeds, one run each
        methods: methods to compare
        data: the generated data (flags --num_classes, --decoy)
        report: write a report
    """

    out: str = "runs/x"
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    methods: list[str] = dataclasses.field(default_factory=lambda: ["plain", "cft"])
    data: Data = Data(num_classes=3)
    report: bool = False


def test_a_dataclass_tool_with_lists_and_a_flattened_dataclass(capsys: pytest.CaptureFixture, tmp_path: Path):
    """What `cft demo` (a settings dataclass, `--seeds 0 1`, `--methods a b`, benchmark fields as top-level flags)
    and `cft explain` (`--images a b`) need."""
    tool = Tool(Settings, prog="cft settings", flatten=("data",))
    assert tool([]) == Settings()
    argv = ["--seeds", "0", "1", "--methods", "cft", "rrr", "--num_classes", "4", "--decoy", "--report"]
    got = tool(argv)
    assert got == Settings(seeds=[0, 1], methods=["cft", "rrr"], data=Data(num_classes=4, decoy=True), report=True)
    with pytest.raises(SystemExit):
        tool.parse([*argv, "--print_config"])
    path = tmp_path / "s.yaml"
    path.write_text(capsys.readouterr().out)
    assert yaml.safe_load(path.read_text())["seeds"] == [0, 1]
    assert tool(["--config", str(path)]) == got
    assert tool(["--config", str(path), "--seeds", "7"]).seeds == [7]
    with pytest.raises(SystemExit):
        tool.parse(["--seeds", "x"])
    help_text = tool.parser().format_help()
    for flag, default in (("--seeds", "[0]"), ("--num_classes", "3"), ("--decoy", "False"), ("--out", "runs/x")):
        assert flag in help_text and f"default: {default}" in help_text, flag


def test_a_tool_parameter_cannot_shadow_config():
    def bad(config: str) -> None:
        """Bad.

        Args:
            config: a clash
        """

    with pytest.raises(TypeError, match="config"):
        Tool(bad, prog="cft bad")


@dataclasses.dataclass
class Outer:
    """Settings with a nested dataclass, as `DemoSettings` and its benchmark.

    Args:
        seeds: seeds, one run each
        data: the generated data
        width: a field the command line leaves out
    """

    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    data: Data = dataclasses.field(default_factory=Data)
    width: int = 8


def run_outer(settings: Outer, report: bool = False) -> tuple[Outer, bool]:
    """A wrapper taking flattened settings, as `cft demo`'s `demo_command`.

    Args:
        settings: what runs
        report: write a report only
    """
    return settings, report


@dataclasses.dataclass
class Clash:
    """Clash.

    Args:
        report: the wrapper's flag again
    """

    report: bool = True


def clash(settings: Clash, report: bool = False) -> None:
    """Clash.

    Args:
        settings: flattened
        report: a flag twice
    """


def test_a_flattened_dataclass_may_hold_lists_a_flattened_dataclass_and_skipped_fields(tmp_path: Path,
                                                                                       capsys: pytest.CaptureFixture):
    tool = Tool(run_outer, prog="cft outer", flatten=("settings", "data"), skip=("width", "decoy"))
    flags = {a.option_strings[-1] for a in tool.parser()._actions if a.option_strings}
    assert flags == {"--help", "--config", "--print_config", "--seeds", "--num_classes", "--report"}
    assert tool([]) == (Outer(), False)
    argv = ["--seeds", "1", "2", "--num_classes", "3", "--report"]
    assert tool(argv) == (Outer(seeds=[1, 2], data=Data(num_classes=3)), True)
    with pytest.raises(SystemExit):
        tool.parse([*argv, "--print_config"])
    path = tmp_path / "outer.yaml"
    path.write_text(capsys.readouterr().out)
    assert yaml.safe_load(path.read_text()) == {"seeds": [1, 2], "num_classes": 3, "report": True}
    assert tool(["--config", str(path), "--num_classes", "5"]) == (Outer(seeds=[1, 2], data=Data(num_classes=5)), True)
    with pytest.raises(TypeError, match="report"):
        Tool(clash, prog="cft clash", flatten=("settings",))
    with pytest.raises(TypeError, match="nothing"):
        Tool(run_outer, prog="cft outer", flatten=("nothing",))
